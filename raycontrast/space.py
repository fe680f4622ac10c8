"""Search-space declarations from the config, parsed and checked without Ray.

A space maps dotted config keys to one distribution each, e.g.
`{"loss.temperature": {"loguniform": [0.03, 0.5]}, "memory.size": {"choice": [0, 1000, 5000]}}`.
Kinds: `loguniform: [low, high]`, `uniform: [low, high]`, `int: [low, high]` (inclusive) and `choice: [v, ...]`.
Every bound and choice is validated as a value of its key, so a range the config could never accept is an
error here, before any Ray process starts. `raycontrast.tune` turns the result into Ray Tune distributions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from raycontrast.config import Config, ConfigError, apply_overrides, check_key

Kind = Literal["loguniform", "uniform", "int", "choice"]
KINDS: tuple[Kind, ...] = ("loguniform", "uniform", "int", "choice")
_NOT_SEARCHABLE = ("run.", "tune.")


@dataclass(frozen=True)
class Param:
    """One searched key: `kind` with `values` (low, high) for ranges or the options for `choice`."""

    key: str
    kind: Kind
    values: tuple[Any, ...]

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.values
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind == "int" and int(value) != value:
            return False
        return self.values[0] <= value <= self.values[1]


def _where(key: str) -> str:
    return f"tune.space['{key}']"


def _parse_one(key: str, spec: Any) -> Param:
    where = _where(key)
    if any(key.startswith(p) for p in _NOT_SEARCHABLE):
        raise ConfigError(f"{where}: '{key}' cannot be searched (run.* and tune.* are fixed per search)", key)
    try:
        check_key(key)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}", key) from None
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConfigError(
            f"{where}: expected one of {{{', '.join(k + ': ...' for k in KINDS)}}}, got {spec!r}", key
        )
    kind, args = next(iter(spec.items()))
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown distribution '{kind}'; allowed: {', '.join(KINDS)}", key)
    if not isinstance(args, Sequence) or isinstance(args, str) or not args:
        raise ConfigError(f"{where}: '{kind}' needs a list, e.g. {kind}: [0.03, 0.5]", key)
    values = tuple(args)
    if kind == "choice":
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"{where}: choice has duplicate options {list(values)}", key)
        return Param(key, kind, values)
    if len(values) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}: '{kind}' needs [low, high] numbers, got {list(values)}", key)
    low, high = values
    if not low < high:
        raise ConfigError(f"{where}: low must be < high, got [{low}, {high}]", key)
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {low}", key)
    if kind == "int":
        if int(low) != low or int(high) != high:
            raise ConfigError(f"{where}: int bounds must be integers, got [{low}, {high}]", key)
        values = (int(low), int(high))
    return Param(key, kind, values)


def check_confirm(cfg: Config) -> None:
    """`tune.confirm.seeds` must differ from `run.seed`, which the search's own trials use (checked for the
    search's config only: a confirmation trial's own config has one of those seeds as its run.seed)."""
    c = cfg.tune.confirm
    if c.top_k and cfg.run.seed in c.seeds:
        raise ConfigError(
            f"tune.confirm.seeds: {list(c.seeds)} includes run.seed ({cfg.run.seed}), which the search's own "
            "trials use; choose other seeds",
            key="tune.confirm.seeds",
        )


def parse_space(cfg: Config) -> list[Param]:
    """Parse and validate `cfg.tune.space`; every bound / option must be a valid value of its key."""
    params = [_parse_one(key, spec) for key, spec in cfg.tune.space.items()]
    for p in params:
        for value in p.values:
            try:
                apply_overrides(cfg, {p.key: value}, source=_where(p.key))
            except ConfigError as exc:
                detail = str(exc).split("\n", 1)[-1].strip(" -")
                raise ConfigError(
                    f"{_where(p.key)}: {p.kind} value {value!r} is not a valid '{p.key}': {detail}", p.key
                ) from None
    return params


def initial_points(cfg: Config, params: Sequence[Param]) -> list[dict[str, Any]]:
    """`tune.points_to_evaluate` restricted to the searched keys; each value must lie in its range."""
    by_key = {p.key: p for p in params}
    points: list[dict[str, Any]] = []
    for i, point in enumerate(cfg.tune.points_to_evaluate):
        kept = {k: v for k, v in point.items() if k in by_key}
        for k, v in kept.items():
            if not by_key[k].contains(v):
                raise ConfigError(
                    f"tune.points_to_evaluate[{i}]: {k}={v!r} is outside its search space {by_key[k].kind} "
                    f"{list(by_key[k].values)}; widen the space or drop the point",
                    k,
                )
        if kept and kept not in points:
            points.append(kept)
    return points


def startup_trials(cfg: Config) -> int:
    """How many of the search's first trials Optuna's TPE samples at random (`tune.searcher.n_startup_trials`,
    else derived from `tune.num_samples`), counting the published points, which Optuna runs first."""
    t = cfg.tune
    if t.searcher.n_startup_trials is not None:
        return t.searcher.n_startup_trials
    published = len(t.points_to_evaluate)
    return min(max(round(t.num_samples / 4), published + 2), max(10, published))


def describe_searcher(cfg: Config, concurrent: int) -> str:
    """For the plan: how many trials are published points, random, and modelled by TPE; what the
    confirmation stage (`tune.confirm`) adds."""
    t = cfg.tune
    published = min(len(t.points_to_evaluate), t.num_samples)
    random = min(max(startup_trials(cfg) - published, 0), t.num_samples - published)
    modelled = t.num_samples - published - random
    seed = cfg.run.seed if t.searcher.seed is None else t.searcher.seed
    line = (
        f"searcher: Optuna TPE ({'multivariate' if t.searcher.multivariate else 'independent'}, seed {seed}): "
        f"{published} published point(s), {random} random, then {modelled} modelled of {t.num_samples} trials"
    )
    if modelled and concurrent > 1:  # TPE models only ended trials: those still running add random ones
        line += f" (up to {min(concurrent - 1, modelled)} more random while {concurrent} run at once)"
    c = t.confirm
    if c.top_k:
        n = min(c.top_k, t.num_samples) * len(c.seeds)
        line += (
            f"\nconfirm: once they end, the top {c.top_k} configs again with seeds {list(c.seeds)}: {n} more "
            f"trials of {cfg.train.iterations} iterations, from scratch, never stopped early"
        )
    return line
