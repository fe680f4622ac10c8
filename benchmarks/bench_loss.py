"""Speed and peak memory of PixelContrastLoss against a loop-structured dense implementation.

The comparison implementation below mirrors the reference code's structure: per image and class a mask,
nonzero, randperm and gather into a preallocated anchor tensor, then a dense InfoNCE with full [R, R]
(or [R, R + M] with a memory bank) float masks and logits. Both run forward + backward on the same seeded
inputs: B=2, D=256, a 128x256 embedding grid (labels 512x1024), 19 classes, max_samples 1024, max_views
100, random L2-normalised features, 20% wrong predictions; the memory case adds 19 classes x 2 queues x
10,000 slots (380,000 rows), timed against the two products no implementation avoids (F @ X^T forward,
G @ X backward). Timings interleave the compared sides in one process so both see the same machine load;
peak RSS (ru_maxrss) comes from a fresh subprocess per case. The dense memory case runs once.

    python benchmarks/bench_loss.py              # full run (the dense memory case needs ~14 GB of RAM)
    python benchmarks/bench_loss.py --quick      # skips the dense memory case, fewer repeats
    python benchmarks/bench_loss.py --threads 1  # steadier numbers on a busy machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from raycontrast.loss import PixelContrastLoss, contrastive_loss, labels_to_grid, sample_anchors

B, D, H, W, K = 2, 256, 512, 1024, 19
T, BT, MAX_SAMPLES, MAX_VIEWS, IGNORE = 0.1, 0.07, 1024, 100, 255
MEM_PER_QUEUE = 10_000


def make_inputs(with_memory: bool):
    gen = torch.Generator().manual_seed(0)
    h, w = H // 4, W // 4
    embed = F.normalize(torch.randn(B, D, h, w, generator=gen), dim=1)
    labels = torch.randint(0, K, (B, H, W), generator=gen)
    labels[torch.rand(B, H, W, generator=gen) < 0.05] = IGNORE
    grid = labels_to_grid(labels, (h, w))
    wrong = torch.rand(B, h, w, generator=gen) < 0.2
    predict = torch.where(wrong, (grid + torch.randint(1, K, (B, h, w), generator=gen)) % K, grid)
    predict = torch.where(grid == IGNORE, torch.randint(0, K, (B, h, w), generator=gen), predict)
    memory = None
    if with_memory:
        n = 2 * MEM_PER_QUEUE
        feats = torch.randn(K * n, D, generator=gen)
        feats /= feats.norm(dim=1, keepdim=True)  # in place: no transient second copy in the peak RSS
        memory = (feats, torch.arange(K).repeat_interleave(n))
    return embed, labels, predict, memory


# ------------------------------------------------ loop-structured dense comparison (reference structure)


def loop_sample(feats, labels, predict, generator):
    """feats [B, N, D], labels / predict [B, N]: per image, per class mask + nonzero + randperm + gather."""
    classes, total = [], 0
    for b in range(feats.shape[0]):
        present = [int(c) for c in torch.unique(labels[b]) if int(c) != IGNORE]
        keep = [c for c in present if (labels[b] == c).nonzero().shape[0] > MAX_VIEWS]
        classes.append(keep)
        total += len(keep)
    n_view = min(MAX_SAMPLES // total, MAX_VIEWS)
    out = torch.zeros(total, n_view, feats.shape[-1])
    out_labels = torch.zeros(total, dtype=torch.long)
    out_index = torch.zeros(total, n_view, dtype=torch.long)
    row = 0
    for b, keep in enumerate(classes):
        for c in keep:
            hard = ((labels[b] == c) & (predict[b] != c)).nonzero()
            easy = ((labels[b] == c) & (predict[b] == c)).nonzero()
            nh, ne = hard.shape[0], easy.shape[0]
            if nh >= n_view / 2 and ne >= n_view / 2:
                kh = n_view // 2
                ke = n_view - kh
            elif nh >= n_view / 2:
                ke = ne
                kh = n_view - ne
            else:
                kh = nh
                ke = n_view - nh
            hard = hard[torch.randperm(nh, generator=generator)[:kh]]
            easy = easy[torch.randperm(ne, generator=generator)[:ke]]
            idx = torch.cat([hard, easy]).squeeze(1)
            out[row] = feats[b, idx, :]
            out_labels[row] = c
            out_index[row] = b * feats.shape[1] + idx
            row += 1
    return out, out_labels, out_index


def dense_infonce(anchors, labels, memory=None):
    """Full-matrix InfoNCE with float masks, as in the reference code (memory: union contrast set)."""
    n_a, n_v, _ = anchors.shape
    feat = torch.cat(torch.unbind(anchors, dim=1), dim=0)  # [V*A, D], view-major
    lab = labels.repeat(n_v)[:, None]
    contrast, clab = feat, lab
    if memory is not None:
        contrast, clab = torch.cat([feat, memory[0]]), torch.cat([lab, memory[1][:, None]])
    logits = feat @ contrast.t() / T
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    mask = torch.eq(lab, clab.t()).float()
    neg_mask = 1 - mask
    logits_mask = torch.ones_like(mask).scatter_(1, torch.arange(feat.shape[0])[:, None], 0)
    mask = mask * logits_mask
    neg_logits = (torch.exp(logits) * neg_mask).sum(1, keepdim=True)
    log_prob = logits - torch.log(torch.exp(logits) + neg_logits)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return (-(T / BT) * mean_log_prob_pos).mean()


# ------------------------------------------------ cases


def ours_step(embed, labels, predict, memory, gen):
    crit = PixelContrastLoss(T, BT, MAX_SAMPLES, MAX_VIEWS, IGNORE)
    leaf = embed.clone().requires_grad_()

    def step():
        leaf.grad = None
        loss, _ = crit(leaf, labels, predict, memory=memory, generator=gen)
        loss.backward()
        return loss.item()

    return step


def ref_step(embed, labels, predict, memory, gen, out):
    leaf = embed.clone().requires_grad_()
    h, w = H // 4, W // 4
    grid = labels_to_grid(labels, (h, w)).flatten(1)

    def step():
        leaf.grad = None
        feats = leaf.permute(0, 2, 3, 1).contiguous().view(B, h * w, D)
        anchors, anchor_labels, _ = loop_sample(feats, grid, predict.flatten(1), gen)
        loss = dense_infonce(anchors, anchor_labels, memory)
        loss.backward()
        out.update(anchors=anchors.detach(), labels=anchor_labels)
        return loss.item()

    return step


def same_anchor_check(out, ref_loss, memory):
    """Our loss on the very anchors the comparison sampled, and the absolute difference."""
    mine = contrastive_loss(
        out["anchors"], out["labels"], temperature=T, base_temperature=BT,
        memory=None if memory is None else memory[0], memory_labels=None if memory is None else memory[1],
    ).item()  # fmt: skip
    return {"ref_loss": ref_loss, "ours_same_anchors": mine, "abs_diff": abs(mine - ref_loss)}


def clock(fn):
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def run_timing(reps: int, mem_reps: int) -> dict:
    """Interleaved timings (A, B, A, B, ...) so that both sides see the same machine load."""
    gen_o, gen_r, out = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1), {}
    embed, labels, predict, _ = make_inputs(False)
    ours, ref = (
        ours_step(embed, labels, predict, None, gen_o),
        ref_step(embed, labels, predict, None, gen_r, out),
    )
    ours(), ref()  # warm-up
    t_ours, t_ref = [], []
    for _ in range(reps):
        t, loss_ours = clock(ours)
        t_ours.append(t)
        t, loss_ref = clock(ref)
        t_ref.append(t)
    res = {
        "ours": t_ours,
        "ref": t_ref,
        "loss_ours": loss_ours,
        "check": same_anchor_check(out, loss_ref, None),
    }
    embed, labels, predict, memory = make_inputs(True)
    ours = ours_step(embed, labels, predict, memory, gen_o)
    grid = labels_to_grid(labels, (H // 4, W // 4)).flatten(1)
    n_rows = sample_anchors(
        grid, predict.flatten(1), max_samples=MAX_SAMPLES, max_views=MAX_VIEWS, ignore_index=IGNORE
    )[0].numel()
    f = F.normalize(torch.randn(n_rows, D), dim=1)
    # The two products no implementation avoids, into preallocated outputs (no page faults of fresh blocks).
    sim, grad_in, grad = (
        torch.empty(f.shape[0], memory[0].shape[0]),
        torch.randn(f.shape[0], memory[0].shape[0]),
        f.clone(),
    )
    ours()
    t_mem, t_fwd, t_bwd = [], [], []
    for _ in range(mem_reps):
        t, loss_mem = clock(ours)
        t_mem.append(t)
        t_fwd.append(clock(lambda: torch.mm(f, memory[0].t(), out=sim))[0])
        t_bwd.append(clock(lambda: torch.mm(grad_in, memory[0], out=grad))[0])
    res.update(ours_mem=t_mem, mm_fwd=t_fwd, mm_bwd=t_bwd, loss_ours_mem=loss_mem, rows=f.shape[0])
    return res


def run_peak(case: str) -> dict:
    """One warm-up and one measured step of a case; peak RSS of this fresh process."""
    embed, labels, predict, memory = make_inputs(case.endswith("_mem"))
    rss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gen, out = torch.Generator().manual_seed(1), {}
    if case.startswith("ours"):
        step = ours_step(embed, labels, predict, memory, gen)
    else:
        step = ref_step(embed, labels, predict, memory, gen, out)
    runs = [clock(step) for _ in range(1 if case == "ref_mem" else 2)]
    res = {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "inputs_mb": rss_inputs}
    if case == "ref_mem":  # the dense memory case runs once: its time and value check come from here
        res.update(time_s=runs[-1][0], check=same_anchor_check(out, runs[-1][1], memory))
    return res


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(
                (line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), model
            )
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"


def spawn(args: list[str], threads: int) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), *args, "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(f"  {' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
        return None
    return json.loads(lines[-1][len("RESULT ") :])


def fmt(times: list[float]) -> str:
    return f"median {statistics.median(times) * 1e3:9.1f} ms  min {min(times) * 1e3:9.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="skip the dense memory case, fewer repeats")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=None, help="in-batch repeats (memory case: a third)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reps = args.repeats or (3 if args.quick else 9)
    if args.child == "timing":
        print("RESULT " + json.dumps(run_timing(reps, max(1, reps // 3))))
        return
    if args.child:
        print("RESULT " + json.dumps(run_peak(args.child)))
        return
    print(f"machine: {machine()}")
    print(
        f"inputs: B={B} D={D} grid {H // 4}x{W // 4} (labels {H}x{W}) K={K} max_samples={MAX_SAMPLES} max_views={MAX_VIEWS}"
    )
    timing = spawn(["--child", "timing", "--repeats", str(reps)], args.threads)
    cases = ["ours", "ref", "ours_mem"] + ([] if args.quick else ["ref_mem"])
    peaks = {case: spawn(["--child", case], args.threads) for case in cases}
    if timing is None:
        return
    ours, ref = timing["ours"], timing["ref"]
    print(f"\nin-batch, forward + backward incl. sampling ({reps} interleaved runs):")
    print(f"  PixelContrastLoss       {fmt(ours)}  loss {timing['loss_ours']:.6f}")
    print(f"  loop-structured dense   {fmt(ref)}  loss {timing['check']['ref_loss']:.6f}")
    print(
        f"  speed-up: {statistics.median(ref) / statistics.median(ours):.1f}x (median), {min(ref) / min(ours):.1f}x (min)"
    )
    print(
        f"  same anchors: ours {timing['check']['ours_same_anchors']:.6f}, |diff| {timing['check']['abs_diff']:.2e}"
    )
    mem, both = timing["ours_mem"], [a + b for a, b in zip(timing["mm_fwd"], timing["mm_bwd"], strict=True)]
    print(
        f"\nmemory bank {K} x 2 x {MEM_PER_QUEUE} = {2 * K * MEM_PER_QUEUE} rows ({len(mem)} interleaved runs):"
    )
    print(f"  PixelContrastLoss       {fmt(mem)}  loss {timing['loss_ours_mem']:.6f}")
    print(f"  F@X^T                   {fmt(timing['mm_fwd'])}   ({timing['rows']} rows)")
    print(f"  G@X                     {fmt(timing['mm_bwd'])}")
    print(
        f"  ours / (F@X^T + G@X): {statistics.median(mem) / statistics.median(both):.2f} (median), {min(mem) / min(both):.2f} (min)"
    )
    dense = peaks.get("ref_mem")
    if dense:
        print(
            f"  loop-structured dense   {dense['time_s'] * 1e3:9.1f} ms (1 run), speed-up {dense['time_s'] / statistics.median(mem):.1f}x"
        )
        print(
            f"  same anchors: dense {dense['check']['ref_loss']:.6f}, ours {dense['check']['ours_same_anchors']:.6f}, |diff| {dense['check']['abs_diff']:.2e}"
        )
    print("\npeak RSS per case (fresh process; inputs alone in brackets):")
    for case in ["ours", "ref", "ours_mem", "ref_mem"]:
        r = peaks.get(case)
        print(
            f"  {case:<10} "
            + (f"{r['peak_mb']:8.0f} MB  ({r['inputs_mb']:.0f} MB)" if r else "skipped / failed")
        )
    if peaks.get("ours_mem") and dense:
        print(f"  memory case peak ratio ours / dense: {peaks['ours_mem']['peak_mb'] / dense['peak_mb']:.3f}")


if __name__ == "__main__":
    main()
