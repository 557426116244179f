"""The reproduction presets (issue 6): every preset runs at smoke scale into a temporary
folder, a second run skips the finished cells, and the report is generated from the result
files alone; plus the statistics and selection rules the verdicts rest on."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from silent_kernels.api import cli, reproduce
from silent_kernels.api.reproduce import (choose, grid_points, mean_ci, plan, run_preset, verdict_better,
                                          verdict_similar)
from silent_kernels.api.reproduce import diagnosis
from silent_kernels.api.reproduce.statistics import seeds_needed


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("reproduce")
    out, runs = str(root / "results"), str(root / "runs")
    ran = {}
    for preset in ("table2", "table1", "table34-diagnosis", "table34", "ppca", "m1", "categorical"):
        ran[preset] = run_preset(preset, "smoke", out_dir=out, runs_dir=runs, log=lambda m: None)
    report = str(root / "docs" / "reproduction.md")
    assert cli.main(["reproduce", "report", "--results", out, "--out", report]) == 0
    return {"root": root, "out": out, "runs": runs, "ran": ran, "report": report}


def test_every_preset_ran_at_smoke_scale(smoke):
    ran = smoke["ran"]
    # arms x (lr grid on the screening seed 0 + seed 1 at the chosen point)
    assert ran["table2"]["ran"] == 5 * (2 + 1)
    assert ran["table1"] == {**ran["table1"], "ran": 0, "skipped": 15}   # the cells of table2
    # lr-grid arms (3 baselines, 2 SG alone) + "with SG" arms (inherited lr, their own 2-point grid)
    # + SG alone with the exact log term at the Taylor arm's chosen point (both seeds)
    assert ran["table34"]["ran"] == 5 * (2 + 1) + 3 * (2 + 1) + 2
    assert ran["ppca"]["ran"] == 2
    assert ran["m1"]["ran"] == 2 * (2 + 1)
    # categorical: 4 linear arms with the lr grid, 5 nonlinear arms at one lr on both seeds
    assert ran["categorical"]["ran"] == 4 * (2 + 1) + 5 * 2
    assert ran["table34-diagnosis"]["ran"] == 1 * 2 * 2    # lr x beta2 x floor, one seed, no test split
    for preset, n in (("table2", 15), ("table34", 26), ("m1", 6), ("ppca", 2), ("categorical", 22)):
        files = [f for f in os.listdir(os.path.join(smoke["out"], preset, "smoke")) if f.endswith(".json")]
        assert len(files) == n
    # results are small JSON files with the curves, the test metrics and the gradient variance
    r = json.load(open(os.path.join(smoke["out"], "table2", "smoke", "reinforce__lr1e-03__s0.json")))
    assert r["status"] == "ok" and r["test"]["bpd"] > 0 and len(r["curve"]) == 3
    assert set(r["gradvar"]) == {"1", "2", "3"}
    assert r["gradvar"]["2"]["silent"] == {"total": 0.0, "bit_identical": True}
    assert r["gradvar"]["2"]["reinforce"]["total"] > 0
    assert os.path.getsize(os.path.join(smoke["out"], "table2", "smoke", "reinforce__lr1e-03__s0.json")) < 20_000
    # the "with SG" arms took the learning rate chosen for their baseline
    res = reproduce.load_results(os.path.join(smoke["out"], "table34", "smoke"))
    chosen = choose(res, "gumbel", [0])["point"]
    assert {r["point"]["lr"] for r in res if r["arm"] == "gumbel+sg"} == {chosen["lr"]}
    # screening: every grid point ran seed 0, only the chosen point ran seed 1
    assert {r["point"]["lr"] for r in res if r["arm"] == "sg-gaussian-exact"} == {choose(res, "sg-gaussian", [0])["point"]["lr"]}
    for arm in ("reparam", "gumbel", "reinforce", "sg-gaussian", "sg-bernoulli", "reparam+sg"):
        c = choose(res, arm, [0])
        assert c["seeds"] == [0]
        seeds = {json.dumps(r["point"], sort_keys=True): sorted(x["seed"] for x in res if x["arm"] == arm
                                                                and x["point"] == r["point"])
                 for r in res if r["arm"] == arm}
        assert sorted(seeds.values()) == [[0], [0, 1]]
        assert seeds[json.dumps(c["point"], sort_keys=True)] == [0, 1]
    # SG alone: the linear head's bound, exact with Gaussian latents (and the Taylor value the paper's
    # arm trained on beside it), the Taylor approximation with Bernoulli latents; every cell tested
    # at its best-validation checkpoint with the importance-weighted bound
    for arm, kind in (("sg-gaussian", "exact"), ("sg-gaussian-exact", "exact"), ("sg-bernoulli", "taylor-approximation")):
        r = next(x for x in res if x["arm"] == arm)
        assert r["test"]["bpd_linear_kind"] == kind
        assert ("bpd_linear_taylor" in r["test"]) == (arm == "sg-gaussian")
        assert r["test_epoch"] is not None and r["iwae"]["samples"] == 4 and r["test_samples"] == 2
    # the m1 arm really trained with the M1 objective and the linear head logs the entropy gap
    m1 = json.load(open(os.path.join(smoke["out"], "m1", "smoke", "m1__lr1e-03__s0.json")))
    assert m1["config"]["objective"] == "m1" and "train_m1" in m1["curve"][0]
    assert "val_entropy_gap" in m1["curve"][-1]


def test_second_run_skips_finished_cells(smoke):
    res = run_preset("m1", "smoke", out_dir=smoke["out"], runs_dir=smoke["runs"], log=lambda m: None,
                     figures=False)
    assert res["ran"] == 0 and res["skipped"] == 6


def test_report_is_generated_from_the_results(smoke):
    text = open(smoke["report"]).read()
    assert "MSE expected" in text and "arm pairs ordered as in the paper" in text
    assert "Tables 3-4 diagnosis" in text and "largest rise" in text
    assert "SG alone, its linear learned-variance head" in text and "exact log term (ours)" in text
    for title in ("Table 1", "Table 2", "Tables 3-4: learnable variance, MNIST", "Companion 1", "Companion 2",
                  "Extension: categorical latents", "How verdicts are computed", "Summary"):
        assert title in text
    assert "6.718" in text and "1.37e+04" in text and "330.77" in text     # the paper's numbers
    assert "Convergence milestone" in text
    for verdict in ("**reproduced**", "**inconclusive**"):
        assert verdict in text
    assert "plumbing checks" in text                                      # smoke results flagged
    # figures are linked relative to the report and exist
    for rel in ("table2/smoke/figures/curves.png", "ppca/smoke/figures/ppca.png",
                "table34/smoke/figures/reconstructions.png", "m1/smoke/figures/curves.png"):
        assert rel in text and os.path.isfile(os.path.join(smoke["out"], rel))
    # the zero-variance claim holds exactly even at smoke scale
    for kind in ("continuous", "categorical"):
        line = next(l for l in text.splitlines() if f"Silent Gradients ({kind}): the encoder-gradient variance" in l)
        assert "**reproduced**" in line
    # pPCA verdicts are threshold tests that hold at smoke scale too
    assert all("**reproduced**" in l for l in text.splitlines() if l.startswith("| Companion 1 |"))
    # no table row is broken by a '|' inside a cell
    for l in text.splitlines():
        if l.startswith("| table |") or l.startswith("| Companion") or l.startswith("| Extension"):
            assert l.replace("\\|", "").count("|") == 5


def test_plans_at_every_scale_without_data():
    for scale in ("smoke", "cpu", "paper"):
        p = plan("table2", scale)
        assert [a.key for a in p.arms] == ["silent-gaussian", "reparam", "silent-bernoulli", "gumbel", "reinforce"]
        assert len(p.seeds) >= 2 and (scale == "smoke" or len(p.seeds) >= 3)
        assert all(a.overrides["sigma2"] == 0.01 and a.overrides["latent_dim"] == (8 if scale == "smoke" else 200)
                   for a in p.arms)
        assert len(p.arms[0].overrides["gradvar_epochs"]) == 3
    paper = plan("table34", "paper")
    assert paper.arms[0].key == "sg-gaussian"
    sg = {a.key: a for a in paper.arms}
    assert len(grid_points(sg["reparam+sg"].grid)) == 4 * 5 and sg["reparam+sg"].inherit == {"lr": "reparam"}
    assert sg["reinforce"].overrides["epochs"] == 300 and sg["reparam"].overrides["epochs"] == 200
    assert plan("table2", "paper").arms[0].grid["lr"] == [1e-4, 5e-4, 1e-5, 5e-5]
    assert plan("table34-cifar10", "paper").arms[0].overrides["batch_size"] == 256
    with pytest.raises(ValueError):
        plan("table34-cifar10", "cpu")
    assert "core-hours" in plan("table34", "cpu").budget
    # the decision protocol of Tables 3-4 at cpu scale
    cpu = plan("table34", "cpu")
    arms = {a.key: a for a in cpu.arms}
    assert cpu.seeds == [0, 1, 2, 3, 4] and cpu.screen_seeds == [0]
    assert (cpu.test_checkpoint, cpu.test_samples, cpu.iwae) == ("best", 10, {"samples": 100, "images": 1000})
    assert arms["reparam"].grid == {"lr": [1e-4, 5e-4]}
    assert arms["reinforce+sg"].grid == {"anneal_rate": [1 / 22, 2 / 22], "cutoff_epoch": [None]}
    assert arms["sg-bernoulli"].grid == {"lr": [1e-4, 5e-4], "cutoff_epoch": [12]}
    assert arms["sg-gaussian-exact"].overrides["log_term"] == "exact"
    assert arms["sg-gaussian-exact"].inherit == {"lr": "sg-gaussian", "cutoff_epoch": "sg-gaussian"}
    assert arms["sg-gaussian"].overrides["log_term"] == "taylor"
    assert all(a.overrides["keep_best"] and a.overrides["betas"] == arms["reparam"].overrides["betas"]
               and a.overrides["logvar_floor"] == arms["reparam"].overrides["logvar_floor"] for a in cpu.arms)
    assert cpu.n_cells() == 8 * (2 + 4) + 5
    assert plan("table1", "cpu").source == "table2"


def test_statistics_and_verdict_rules():
    ci = mean_ci([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["hi"] - ci["mean"] == pytest.approx(4.303 * 1.0 / 3 ** 0.5)
    assert mean_ci([5.0])["lo"] is None and mean_ci([])["n"] == 0
    a, b = {0: 1.0, 1: 1.1, 2: 0.9}, {0: 2.0, 1: 2.2, 2: 1.9}
    assert verdict_better(a, b)["verdict"] == "reproduced"
    assert verdict_better(b, a)["verdict"] == "not reproduced"
    assert verdict_better(b, a, lower_is_better=False)["verdict"] == "reproduced"
    assert verdict_better({0: 1.0, 1: 2.0, 2: 1.5}, {0: 1.2, 1: 1.9, 2: 1.6})["verdict"] == "inconclusive"
    assert verdict_better({0: 1.0}, {0: 2.0})["verdict"] == "inconclusive"
    assert verdict_similar({0: 100.5, 1: 100.2, 2: 99.9}, {0: 100.0, 1: 100.0, 2: 100.0}, margin=0.02)["verdict"] == "reproduced"
    assert verdict_similar({0: 150.0, 1: 151.0, 2: 149.0}, {0: 100.0, 1: 100.0, 2: 100.0}, margin=0.02)["verdict"] == "not reproduced"


def test_choose_takes_the_lowest_mean_validation_bpd_among_complete_points():
    def cell(lr, seed, bpd, status="ok"):
        return {"arm": "x", "point": {"lr": lr}, "seed": seed, "status": status, "final_val": {"bpd": bpd}}
    results = [cell(1e-3, 0, 5.0), cell(1e-3, 1, 5.2), cell(5e-4, 0, 4.0), cell(5e-4, 1, 6.4),
               cell(2e-3, 0, 1.0)]                                  # incomplete point: 1 of 2 seeds
    c = choose(results, "x", [0, 1])
    assert c["point"] == {"lr": 1e-3} and c["score"] == pytest.approx(5.1)
    results.append(cell(2e-3, 1, None, status="nonfinite"))         # a diverged seed disqualifies
    assert choose(results, "x", [0, 1])["point"] == {"lr": 1e-3}
    assert choose(results, "y", [0, 1]) is None


def test_choose_compares_grid_points_on_the_seeds_they_share():
    def cell(lr, seed, bpd):
        return {"arm": "x", "point": {"lr": lr}, "seed": seed, "status": "ok", "final_val": {"bpd": bpd}}
    # screened: lr 1e-3 won on seed 0 and then ran seeds 1-2 (worse there); the choice must not flip
    results = [cell(1e-3, 0, 4.0), cell(5e-4, 0, 4.5), cell(1e-3, 1, 9.0), cell(1e-3, 2, 9.0)]
    c = choose(results, "x", [0])
    assert c["point"] == {"lr": 1e-3} and c["seeds"] == [0] and c["score"] == pytest.approx(4.0)
    # every point ran every seed: all of them count
    results += [cell(5e-4, 1, 4.5), cell(5e-4, 2, 4.5)]
    c = choose(results, "x", [0])
    assert c["point"] == {"lr": 5e-4} and c["seeds"] == [0, 1, 2]
    # the screening seed is required
    assert choose([cell(1e-3, 1, 1.0)], "x", [0]) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_cell_workers_end_with_the_runner(tmp_path):
    """A worker process set up by the runner's initializer is terminated when its parent dies
    (a killed `reproduce run --jobs 2` left two cells training on before)."""
    pid_file = tmp_path / "worker.pid"
    script = tmp_path / "runner.py"
    script.write_text(textwrap.dedent(f"""
        import multiprocessing, os, time
        from silent_kernels.api.reproduce.runner import die_with_parent
        def work(path):
            die_with_parent()
            open(path, "w").write(str(os.getpid()))
            time.sleep(120)
        if __name__ == "__main__":
            multiprocessing.get_context("spawn").Process(target=work, args=({str(pid_file)!r},)).start()
            time.sleep(120)
        """))
    parent = subprocess.Popen([sys.executable, str(script)])
    deadline = time.time() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline, "the worker did not start"
        time.sleep(0.1)
    worker = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            with open(f"/proc/{worker}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":   # exited, not yet reaped
                    return
        except FileNotFoundError:
            return
        time.sleep(0.1)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the worker outlived its parent")


def test_diagnosis_plan_and_stability_numbers():
    p = plan("table34-diagnosis", "cpu")
    # lr {1e-4, 5e-4} at (0.95, default floor) + the 2 x 2 square at 5e-4, sharing one point; 2 seeds
    assert p.n_cells() == (2 + 4 - 1) * 2 and p.test_split is False and p.screen_seeds is None
    arm = p.arms[0]
    assert arm.overrides["estimator"] == "reparam" and arm.overrides["variance"] == "learned"
    slugs = [reproduce.point_slug(pt) for a in p.arms for pt in grid_points(a.grid)]
    assert "b0.9-0.999_fl-11.09_lr5e-04" in slugs and "b0.9-0.95_flnone_lr1e-04" in slugs
    assert slugs.count("b0.9-0.95_flnone_lr5e-04") == 2 and len(set(slugs)) == 5
    curve = [{"epoch": e, "val_bpd": v, "val_floor_fraction": f}
             for e, (v, f) in enumerate([(5.0, 0.0), (4.0, 0.1), (4.7, 0.2), (3.5, 0.3), (4.2, 0.25)], 1)]
    cell = {"curve": curve, "seed": 1, "status": "ok", "config": {"lr": 1e-3, "betas": [0.9, 0.95],
                                                                   "logvar_floor": None}}
    st = diagnosis.cell_stability(cell)
    assert st["jumps"] == 2 and st["largest_rise"] == pytest.approx(0.7)
    assert (st["best"], st["best_epoch"], st["last"]) == (3.5, 4, 4.2)
    assert st["floor_last"] == 0.25 and st["floor_max"] == 0.3 and st["beta2"] == 0.95


def test_seeds_needed_for_a_paired_difference():
    # (t975(n-1) + 0.8416) / sqrt(n) <= 1 first holds at n = 10 (n = 9: 1.049)
    assert seeds_needed(1.0, 1.0) == "10"
    assert seeds_needed(1.0, 2.0) == "5"
    assert seeds_needed(10.0, 0.01, most=50) == ">50"


def test_cell_protocol_best_checkpoint_samples_and_iwae(tmp_path):
    from silent_kernels.api.reproduce.runner import run_cell
    p = plan("table34-diagnosis", "smoke")
    cfg = {**p.arms[0].overrides, "lr": 3e-3, "betas": [0.9, 0.95], "logvar_floor": None, "seed": 0,
           "keep_best": True, "epochs": 4}
    spec = {"preset": "x", "scale": "smoke", "arm": "reparam", "point": {}, "seed": 0, "config": cfg,
            "name": "cell", "run_dir": str(tmp_path / "run"), "result_path": str(tmp_path / "cell.json"),
            "test_split": False, "test_checkpoint": "best", "test_samples": None,
            "iwae": {"samples": 5, "images": 8}}
    r = run_cell(spec)
    curve = [c["val_bpd"] for c in r["curve"]]
    best_epoch = 1 + curve.index(min(curve))
    assert r["test_epoch"] == best_epoch
    # without a test split the "test" images are the validation images: the best checkpoint's
    # evaluation repeats that epoch's validation record and the last one the final record
    assert r["test"]["bpd"] == pytest.approx(min(curve), rel=1e-6)
    assert r["test_last"]["bpd"] == pytest.approx(curve[-1], rel=1e-6) and r["test_last_samples"] == 1
    assert r["iwae"]["samples"] == 5 and r["iwae"]["n"] == 8 and r["iwae"]["bpd"] > 0
    assert os.path.isfile(tmp_path / "run" / "checkpoints" / "best.pt")


def test_run_health_flags_saturated_and_dead_runs():
    from silent_kernels.api.reproduce.results import reported_val_bpd, run_health
    level = 4 * math.log(2)
    curve = [{"epoch": 1, "val_kld": level, "val_bpd": 6.0}, {"epoch": 2, "val_kld": 3.0, "val_bpd": 5.0},
             {"epoch": 3, "val_kld": level, "val_bpd": 5.5}]
    r = {"config": {"latent": "bernoulli", "latent_dim": 4}, "curve": curve, "final_val": {"bpd": 5.5},
         "test": {"kld": 3.0, "mse": 20.0}, "mean_image_mse": {"test": 52.0}}
    assert run_health(r) == {"saturated_epochs": 2, "dead": False, "why": ""}
    assert run_health({**r, "test": {"kld": level, "mse": 20.0}})["dead"]          # constant codes
    h = run_health({**r, "test": {"kld": 3.0, "mse": 51.5}})                        # the mean image
    assert h["dead"] and "mean image" in h["why"]
    gauss = {**r, "config": {"latent": "gaussian", "latent_dim": 4}}
    assert run_health(gauss)["saturated_epochs"] == 0
    # the reported checkpoint's validation BPD: the last epoch, or the best one when tested there
    assert reported_val_bpd(r) == 5.5 and reported_val_bpd({**r, "test_epoch": 2}) == 5.0


def test_report_flags_results_made_under_an_earlier_plan():
    from silent_kernels.api.reproduce.ours import stale_fields as _stale_fields
    p = plan("table34", "cpu")
    arm = next(a for a in p.arms if a.key == "reparam")
    current = {"arm": "reparam", "config": {**arm.overrides, "lr": 1e-4, "seed": 0}, "test_epoch": 7,
               "test_samples": 10, "iwae": {"samples": 100}}
    assert _stale_fields([current], p) == []
    old = {**current, "config": {**current["config"], "lr": 1e-3, "epochs": 12, "keep_best": False},
           "test_epoch": None, "iwae": None}
    stale = " ".join(_stale_fields([old], p))
    for field in ("epochs: plan 15, result 12", "lr: plan grid", "keep_best", "test checkpoint", "IWAE samples"):
        assert field in stale


def test_paired_spread_credits_pairing_by_seed():
    from silent_kernels.api.reproduce.markdown import Section
    from silent_kernels.api.reproduce.table34 import paired_spread

    def arm(values):
        return [{"seed": s, "test": {"bpd": v}} for s, v in enumerate(values)]
    base = [3.0, 3.4, 3.1, 3.6]
    live = {"reparam": arm(base), "sg-gaussian": arm([v + 0.5 + e for v, e in zip(base, (0.01, -0.01, 0.02, 0.0))]),
            "gumbel": arm([4.0, 4.1])}          # two seeds: no row
    s = Section()
    paired_spread(s, live)
    rows = [line for line in s.lines if line.startswith("| None + SG")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[:3] == ["None + SG (continuous)", "Reparameterization", "4"]
    paired, unpaired = float(cells[3]), float(cells[4])
    assert paired == pytest.approx(0.0126, abs=5e-4) and unpaired > 10 * paired
    assert cells[5] == "3" and int(cells[6]) > 10   # n = 2: (12.71 + 0.84) 0.0126 / sqrt(2) > 0.11
    s = Section()
    paired_spread(s, {"reparam": arm(base)})
    assert s.lines == []


def test_table34_claims_are_all_listed_and_inconclusive_ones_carry_their_power():
    from silent_kernels.api.reproduce.markdown import Section
    from silent_kernels.api.reproduce.table34 import _claims

    def arm(bpd, kld):
        return [{"seed": s, "test": {"bpd": b, "kld": k}} for s, (b, k) in enumerate(zip(bpd, kld))]
    live = {"reparam": arm([3.0, 3.4, 3.1, 3.6], [150.0] * 4),
            "reparam+sg": arm([3.1, 3.3, 3.2, 3.5], [160.0, 170.0, 165.0, 161.0]),
            "sg-bernoulli": arm([4.0, 4.1, 4.0], [120.0] * 3),
            "reinforce": arm([5.0, 5.3, 5.1], [100.0] * 3)}
    per = {**live, "gumbel": arm([9.0], [1.0])}          # in the runs, but dead: not live
    s = Section()
    _claims(s, per, live, "mnist")
    claims = dict(s.claims)
    assert len(claims) == 7
    by_start = {text.split(" (paper")[0]: v for text, v in claims.items()}
    bpd = by_start["Reparameterization: with SG has a lower BPD than without"]
    assert bpd["verdict"] == "inconclusive"
    assert "power: the paired sd" in bpd["reason"] and "0.11 bits" in bpd["reason"]
    assert by_start["Reparameterization: with SG has a higher KLD than without"]["verdict"] == "reproduced"
    gumbel = by_start["Gumbel-Softmax: with SG has a lower BPD than without"]
    assert gumbel["verdict"] == "inconclusive" and "Gumbel-Softmax has only dead runs" in gumbel["reason"]
    assert "Gumbel-Softmax + SG has no complete result yet" in gumbel["reason"]
    assert by_start["SG alone (discrete) has a lower BPD than REINFORCE without SG"]["verdict"] == "reproduced"


def test_sg_alone_exact_training_is_compared_with_taylor_training_by_seed():
    from silent_kernels.api.reproduce.markdown import Section
    from silent_kernels.api.reproduce.table34 import _exact_vs_taylor_training

    def arm(bpd, linear):
        return [{"seed": s, "test": {"bpd": b, "bpd_linear": c}} for s, (b, c) in enumerate(zip(bpd, linear))]
    per = {"sg-gaussian": arm([4.0, 3.9, 4.1], [5.9, 5.8, 6.0]),
           "sg-gaussian-exact": arm([4.05, 3.96, 4.14], [5.9, 5.8, 6.0])}
    s = Section()
    _exact_vs_taylor_training(s, per)
    text = " ".join(s.lines)
    assert "test BPD 0.050 [" in text and "exact bound 0 [0, 0] bits (n = 3)" in text
    s = Section()
    _exact_vs_taylor_training(s, {**per, "sg-gaussian-exact": arm([4.0], [5.9])})   # one common seed: no line
    assert s.lines == []
