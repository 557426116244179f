"""The runner: train, evaluate and record every missing cell of a preset.

Every cell (arm x grid point x seed) is one ``Trainer`` run in ``<runs>/<preset>/<scale>/<cell>``
(resumable: a killed cell continues from its checkpoint) and leaves one small JSON file in
``<out>/<preset>/<scale>/<cell>.json``; finished cells are skipped, so ``run_preset`` can be
repeated or split (``arms``, ``seeds``). Learning rates (and at ``paper`` scale the Algorithm 1
annealing rate and cut-off) are chosen per arm like the paper (``results.choose``); the "with
SG" arms take the learning rate chosen for their baseline (paper Appendix B.3), so they run
after it. At smoke/cpu scale the grid is screened on ``Plan.screen_seeds`` and the other seeds
run at the chosen point only. Reported numbers are then *test* metrics of the chosen point.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Callable, Optional

from .plans import DATASETS, Arm, Plan, default_data_root, grid_points, plan, point_slug
from .results import RESULT_FORMAT, cell_identity, stored_config, chosen_cells, choose, load_results, read_json, write_json
from .statistics import format_value

__all__ = ["run_preset", "run_cell", "cell_name"]



_CURVE_KEYS = ("epoch", "train_loss", "train_m1", "val_bpd", "val_mse", "val_kld", "val_elbo",
               "val_entropy_gap", "val_mse_expected", "val_floor_fraction", "w_lin", "encoder_frozen", "time_s")


def _round(v, digits: int = 7):
    """``v`` to ``digits`` significant digits (keeps the JSON small); non-finite floats -> None."""
    if isinstance(v, float):
        return float(f"{v:.{digits}g}") if math.isfinite(v) else None
    return v


def run_cell(spec: dict) -> dict:
    """Train one cell, evaluate it and write its JSON (also usable in a worker process).
    ``spec``: preset, scale, arm, point, seed, config, run_dir, result_path, test_split and the
    optional protocol fields of ``Plan``: test_checkpoint ("best": ``test`` is measured on
    checkpoints/best.pt, ``test_last`` after the last epoch with the config's draws per image
    (``test_last_samples``), ``test_epoch`` names the best epoch), test_samples (latent draws per
    test image) and iwae ({"samples", "images"})."""
    import torch

    from .. import data as data_mod
    from ..evaluate import evaluate, importance_weighted_bound
    from ..checkpoints import load_checkpoint
    from ..train import NonFiniteLossError, Trainer, TrainConfig, read_metrics

    cfg = TrainConfig.from_dict(spec["config"]).validate()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    run_dir = spec["run_dir"]
    resume = os.path.isfile(os.path.join(run_dir, "checkpoints", "last.pt"))
    log = spec.get("log")
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir, resume=resume, log=(lambda m: None) if not log else print)
    status = "ok"
    try:
        trainer.fit()
    except NonFiniteLossError as exc:
        status = "nonfinite"
        print(f"  {spec['name']}: {exc}", file=sys.stderr)
    metrics = read_metrics(trainer.metrics_path)
    train_time = time.perf_counter() - t0
    test, test_source, extra = None, None, {}
    if status == "ok":
        images = None
        if spec.get("test_split", True) and data_mod.has_test_split(cfg.dataset):
            images, _ = data_mod.load_dataset(cfg.dataset, cfg.data_root, "test")
            test_source = "test"
        if images is None:
            images, test_source = trainer.data.val, "validation (no test split)"
        samples = spec.get("test_samples")
        extra["test_samples"] = samples or cfg.eval_samples
        best_only = spec.get("test_checkpoint", "last") == "best"
        # the last epoch, when only for reference, with the config's (cheaper) draws per image
        test = {k: _round(v) for k, v in
                evaluate(trainer.model, images, cfg, samples=None if best_only else samples).items()}
        if best_only:
            best = load_checkpoint(trainer.best_path)
            trainer.model.load_state_dict(best["model"])
            extra["test_last"], extra["test_epoch"] = test, int(best["epoch"])
            extra["test_last_samples"] = cfg.eval_samples
            test = {k: _round(v) for k, v in evaluate(trainer.model, images, cfg, samples=samples).items()}
        extra["mean_image_mse"] = {"val": _round(_mean_image_mse(trainer.data.train, trainer.data.val, cfg)),
                                   "test": _round(_mean_image_mse(trainer.data.train, images, cfg))}
        if spec.get("iwae"):
            n, s_ = spec["iwae"]["images"], spec["iwae"]["samples"]
            extra["iwae"] = {k: _round(v) for k, v in
                             importance_weighted_bound(trainer.model, images[:n], cfg, samples=s_).items()}
    final = metrics[-1] if metrics else {}
    gradvar = {str(r["epoch"]): {est: {"total": _round(v["total"]), "bit_identical": v["bit_identical"]}
                                 for est, v in r["gradvar"].items()}
               for r in metrics if "gradvar" in r}
    out = {
        "format": RESULT_FORMAT, "preset": spec["preset"], "scale": spec["scale"], "arm": spec["arm"],
        "point": spec["point"], "seed": spec["seed"], "status": status,
        "config": cell_identity(trainer.cfg.to_dict()),
        "n_train": int(trainer.data.train.shape[0]), "n_val": int(trainer.data.val.shape[0]),
        "val_source": trainer.data.val_source,
        "final_val": {k[4:]: _round(v) for k, v in final.items() if k.startswith("val_")},
        "epochs_done": int(final.get("epoch", 0)),
        "test": test, "test_source": test_source, **extra,
        "curve": [{k: _round(r[k]) for k in _CURVE_KEYS if k in r and r[k] is not None} for r in metrics],
        "gradvar": gradvar,
        "wall_time_s": round(time.perf_counter() - t0, 2), "train_time_s": round(train_time, 2),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    write_json(spec["result_path"], out)
    return out


def _mean_image_mse(train_u8, images_u8, cfg) -> float:
    """The MSE (per-image sum) of a model that ignores z and predicts the training mean image: the
    level at which a run is dead (its decoder learned nothing from the latents)."""
    from ..evaluate import eval_images
    mean = eval_images(train_u8, "center").mean(0)
    y = eval_images(images_u8, cfg.eval_dequant, cfg.seed)
    return float((y - mean).square().flatten(1).sum(1).double().mean())


def cell_name(arm: str, point: dict, seed: int) -> str:
    """The name of a cell's run folder and result file."""
    return f"{arm}__{point_slug(point)}__s{seed}"


def _cells(p: Plan, arms: list, out_dir: str, runs_dir: str, chosen: dict, seeds: list) -> list:
    """The specs (``run_cell``'s argument) of ``arms`` at every grid point and seed; inherited
    fields take the value ``chosen`` for their source arm."""
    specs = []
    for arm in arms:
        fixed = {}
        for fld, src in arm.inherit.items():
            if src not in chosen or chosen[src] is None:
                raise LookupError(f"{arm.key}: no chosen {fld} for {src} yet")
            fixed[fld] = chosen[src][fld]
        for point in grid_points(arm.grid):
            full_point = {**fixed, **point}
            for seed in seeds:
                name = cell_name(arm.key, full_point, seed)
                if any(s["name"] == name for s in specs):   # arms slicing one grid share points
                    continue
                config = {**arm.overrides, **full_point, "seed": seed}
                specs.append({"preset": p.cells_preset, "scale": p.scale,
                              "arm": arm.key, "point": full_point, "seed": seed, "config": config,
                              "name": name, "test_split": p.test_split,
                              "test_checkpoint": p.test_checkpoint, "test_samples": p.test_samples,
                              "iwae": p.iwae,
                              "run_dir": os.path.join(runs_dir, p.cells_preset, p.scale, name),
                              "result_path": os.path.join(out_dir, p.cells_preset, p.scale,
                                                          name + ".json")})
    return specs


def _is_done(spec: dict) -> bool:
    """Whether the cell's result file exists, was written for the same config and finished."""
    path = spec["result_path"]
    if not os.path.isfile(path):
        return False
    try:
        res = read_json(path)
    except (OSError, json.JSONDecodeError):
        return False
    from ..train import make_config
    want = cell_identity(make_config(None, spec["config"]).to_dict())
    have = stored_config(res)
    if have != want:
        print(f"  {spec['name']}: the stored result has a different config; it will be re-run",
              file=sys.stderr)
        return False
    return res.get("status") in ("ok", "nonfinite")


def _narrow(arm: Arm, point: dict) -> Arm:
    """``arm`` with its grid reduced to ``point``."""
    return Arm(arm.key, arm.overrides, {k: [v] for k, v in point.items() if k in arm.grid}, arm.inherit)


def run_preset(preset: str, scale: str, *, out_dir: str = "docs/results", runs_dir: str = "runs/reproduce",
               data_root: Optional[str] = None, jobs: int = 1, arms: Optional[list] = None,
               seeds: Optional[list] = None, device: Optional[str] = None, figures: bool = True,
               log: Callable = print) -> dict:
    """Run every missing cell of ``preset`` at ``scale``; returns {"ran", "skipped", "seconds"}."""
    t_start = time.perf_counter()
    if preset in DATASETS and scale != "smoke" and data_root is None:
        ds = DATASETS[preset]
        data_root = default_data_root(ds)
        if data_root is None:
            raise FileNotFoundError(f"{preset} at {scale} scale needs the {ds} files: give --data PATH")
    if data_root is not None:
        data_root = os.path.abspath(data_root)
    p = plan(preset, scale, data_root)
    seeds = list(seeds) if seeds else p.seeds
    if p.kind == "ppca":
        return _run_ppca(p, out_dir, seeds, log, t_start)
    if device:
        for a in p.arms:
            a.overrides["device"] = device
    folder = os.path.join(out_dir, p.cells_preset, scale)
    selected = [a for a in p.arms if not arms or a.key in arms]
    tag = f"[{p.preset} {scale}]"
    screen = p.choice_seeds
    counts = {"ran": 0, "skipped": 0}

    def run_missing(phase_arms: list, chosen: dict, phase_seeds: list) -> None:
        specs = _cells(p, phase_arms, out_dir, runs_dir, chosen, phase_seeds)
        todo = [s for s in specs if not _is_done(s)]
        counts["skipped"] += len(specs) - len(todo)
        counts["ran"] += _execute(todo, jobs, log, tag)

    def screen_then_rest(phase_arms: list, chosen: dict) -> None:
        """Every grid point on the screening seeds, then the other seeds at the chosen point."""
        run_missing(phase_arms, chosen, [s for s in seeds if s in screen])
        rest = [s for s in seeds if s not in screen]
        if rest:
            results = load_results(folder)
            narrowed = []
            for a in phase_arms:
                c = choose(results, a.key, screen)
                if c is None:
                    log(f"{tag} {a.key}: no grid point finished on seeds {screen}; seeds {rest} not run")
                else:
                    narrowed.append(_narrow(a, c["point"]))
            run_missing(narrowed, chosen, rest)

    # first the arms with their own grid, then those that inherit a value chosen for another arm
    # (Algorithm 1's arms take their baseline's learning rate and screen their own grid)
    own_grid = [a for a in selected if not a.inherit]
    if own_grid:
        screen_then_rest(own_grid, {})
    inheriting = [a for a in selected if a.inherit]
    if inheriting:
        results = load_results(folder)
        chosen = {}
        for a in p.arms:
            c = choose(results, a.key, screen)
            chosen[a.key] = c["point"] if c else None
        ready = []
        for a in inheriting:
            missing = [src for src in a.inherit.values() if chosen.get(src) is None]
            if missing:
                log(f"{tag} {a.key}: waiting for {', '.join(missing)} (its learning rate is inherited); "
                    "run that arm first")
            else:
                ready.append(a)
        screen_then_rest(ready, chosen)
    if figures:
        try:
            _reconstruction_figures(p, folder, runs_dir, log)
        except Exception as exc:   # figures are a convenience; never lose a finished run to them
            log(f"{tag} reconstruction figure skipped: {exc}")
    return {**counts, "seconds": time.perf_counter() - t_start}


def die_with_parent() -> None:
    """Worker initializer: on Linux the worker gets SIGTERM when the runner process ends, so a
    stopped or killed ``reproduce run --jobs N`` never leaves cells training (and writing
    results) behind it. Cells are resumable, so a terminated one loses at most its last epoch."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))


def _execute(specs: list, jobs: int, log: Callable, tag: str) -> int:
    """Run ``specs`` (in ``jobs`` spawned processes when > 1), logging one line per cell."""
    def report(i, spec, res):
        val = (res.get("final_val") or {}).get("bpd")
        test = (res.get("test") or {}).get("bpd")
        log(f"{tag} {i}/{len(specs)} {spec['name']}: {res['status']} val_bpd {format_value(val)} test_bpd "
            f"{format_value(test)} ({res['wall_time_s']:.1f} s)")

    if jobs <= 1 or len(specs) <= 1:
        for i, spec in enumerate(specs, 1):
            report(i, spec, run_cell(spec))
        return len(specs)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=die_with_parent) as pool:
        futures = {pool.submit(run_cell, s): s for s in specs}
        for i, fut in enumerate(as_completed(futures), 1):
            report(i, futures[fut], fut.result())
    return len(specs)


def _run_ppca(p: Plan, out_dir: str, seeds: list, log: Callable, t_start: float) -> dict:
    """The ppca preset: one ``ppca.run_experiment`` per seed (no training cells; the report
    draws its figure)."""
    import torch

    from ..ppca import run_experiment

    torch.set_num_threads(1)
    folder = os.path.join(out_dir, "ppca", p.scale)
    ran = skipped = 0
    for seed in seeds:
        path = os.path.join(folder, f"ppca__s{seed}.json")
        if os.path.isfile(path):
            old = read_json(path)
            if old.get("setting", {}).get("steps") == p.ppca["steps"] and old.get("format") == RESULT_FORMAT:
                skipped += 1
                continue
        t0 = time.perf_counter()
        res = run_experiment(seed=seed, **p.ppca)
        res.update(format=RESULT_FORMAT, preset="ppca", scale=p.scale, seed=seed,
                   wall_time_s=round(time.perf_counter() - t0, 2))
        write_json(path, res)
        ran += 1
        log(f"[ppca {p.scale}] seed {seed}: |ELBO - pPCA| {abs(res['learned']['final']['elbo_minus_ppca']):.2e}, "
            f"|gap| {abs(res['learned']['final']['gap']):.2e}, wrong-sigma2 gap "
            f"{res['fixed']['final']['gap']:.3f} ({res['wall_time_s']:.1f} s)")
    return {"ran": ran, "skipped": skipped, "seconds": time.perf_counter() - t_start}


def _reconstruction_figures(p: Plan, folder: str, runs_dir: str, log: Callable) -> None:
    """Reconstructions (and the learned std row) of the chosen point's first seed per arm, from
    the checkpoint its test metrics were measured on (the best-validation one where the result
    names a test epoch, else the last), into ``<folder>/figures/reconstructions.png``."""
    import torch

    from .. import plots
    from ..runs import load_run

    results = load_results(folder)
    models, images = {}, None
    for a in p.arms:
        c, rs = chosen_cells(results, a.key, p.choice_seeds)
        if c is None:
            continue
        name = cell_name(a.key, c["point"], rs[0]["seed"])
        which = "best.pt" if rs[0].get("test_epoch") is not None else "last.pt"
        ckpt = os.path.join(runs_dir, p.cells_preset, p.scale, name, "checkpoints", which)
        if not os.path.isfile(ckpt):
            continue
        cfg, model, data, _ = load_run(os.path.dirname(os.path.dirname(ckpt)), ckpt, "cpu")
        models[a.key] = model
        if images is None:
            images = data.val[:8]
    if models:
        torch.set_num_threads(1)
        path = plots.reconstruction_figure(models, images, os.path.join(folder, "figures",
                                                                        "reconstructions.png"))
        log(f"[{p.preset} {p.scale}] {path}")


