"""scripts/study.py --quick end to end: the report and its figures, scores that order sanely against the floor and
the ceiling, a re-run that redoes only an interrupted model (with the same scores), and a changed plan refused."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SUBPROCESS_ENV, launch
from models.flops import COUNT_VERSION
from scripts import study, study_curves, study_report
from PIL import Image
from test_embedded_data import needs_fmnist

STUDY = REPO / "scripts" / "study.py"


def run_study(out, *flags: str) -> subprocess.CompletedProcess:
    return launch(STUDY, "--quick", f"--out_dir={out}", *flags, nproc=1, check=False, timeout=900)


def scores(out) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "scores").glob("*.json")}


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    if needs_fmnist.args[0]:  # the quick study trains on Fashion-MNIST: the tests using it skip where it is absent
        pytest.skip(needs_fmnist.kwargs["reason"])
    out = tmp_path_factory.mktemp("study")
    # as a module, where the other tests run it by its path as README does: run so, each child of its fork server
    # warned (runpy: scripts.study "found in sys.modules ... prior to execution")
    proc = subprocess.run([sys.executable, "-m", "scripts.study", "--quick", f"--out_dir={out}"], env=SUBPROCESS_ENV,
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "RuntimeWarning" not in proc.stderr, proc.stderr[-4000:]
    return out


def test_quick_study_report_and_scores(quick_study):
    plan = json.loads((quick_study / "plan.json").read_text())
    rows = plan["rows"]
    assert set(rows) == {"var", "intra", "mamba", "mvar", "mvar-w", "mvar-d", "var-half"}
    # the Table 5 rows are narrower / shallower M-VARs (the parameter count closest to VAR's)
    assert rows["mvar-w"]["embed_dim"] < rows["mvar"]["embed_dim"] and rows["mvar-w"]["depth"] == rows["var"]["depth"]
    assert rows["mvar-d"]["depth"] < rows["mvar"]["depth"] and rows["mvar-d"]["embed_dim"] == rows["var"]["embed_dim"]
    assert rows["mvar-w"]["params"] < rows["mvar"]["params"] and rows["mvar-d"]["params"] < rows["mvar"]["params"]

    got = scores(quick_study)
    assert set(got) == {"floor", "ceiling", *plan["runs"]}
    for name, s in got.items():
        assert all(math.isfinite(v) for v in s.values()), (name, s)
        assert "fid_inception" in s  # quick runs one seed: every set gets the Inception FID
    # the classifier reads real images (its consistency there is its accuracy), the tokenizer loses some of it,
    # and two training steps of a generator are far from both
    assert got["floor"]["consistency"] > 0.8
    assert got["floor"]["fd_clf"] < got["ceiling"]["fd_clf"]
    for run in plan["runs"]:
        assert got[run]["fd_clf"] > got["ceiling"]["fd_clf"], run

    # the curves: VAR and M-VAR evaluated after every epoch, VAR trained for twice the epochs (M-VAR's CPU time,
    # roughly); the other rows once, at their end (compared at the largest budget only)
    assert plan["runs"]["var-s0"]["ep"] == 2 * plan["runs"]["mvar-s0"]["ep"] == 4
    for run, spec in plan["runs"].items():
        curve = json.loads((quick_study / "runs" / run / "curve.json").read_text())
        epochs = list(range(1, spec["ep"] + 1)) if spec["row"] in ("var", "mvar") else [spec["ep"]]
        assert [p["epoch"] for p in curve] == epochs, run
        assert [p["images"] for p in curve] == [128 * e for e in epochs], run
        assert all(0 <= p["consistency"] <= 1 and p["fd_clf"] > 0 for p in curve), run
        assert all(a["train_s"] < b["train_s"] for a, b in zip(curve, curve[1:], strict=False)), run

    report = (quick_study / "report" / "study.md").read_text()
    for row in rows.values():
        assert f"| {row['label']} | {row['params'] / 1e6:.2f} |" in report
    # throughput on the curves' clock: the first seed's images over its training seconds at its last evaluation
    clock = json.loads((quick_study / "runs" / "mvar-s0" / "curve.json").read_text())[-1]
    cells = next(line for line in report.splitlines() if line.startswith("| M-VAR |")).split("|")
    assert float(cells[6]) == pytest.approx(clock["images"] / clock["train_s"], abs=0.051), (cells, clock)
    assert "python scripts/study.py --quick" in report and "Ranking by mean FD_clf" in report
    # M-VAR (256 images) against VAR (512) at equal images (M-VAR's final point), FLOPs and time
    assert "at equal training images (256 images): M-VAR FD_clf" in report
    assert "at equal training FLOPs (" in report and "at equal training time on this CPU (" in report
    assert "CPU flags" in report and "Have the models learned" in report
    # the recipe names the study folder's files, not this machine's paths to them
    assert "--eval_net=CLASSIFIER" in report and "--tokens=TOKENS" in report
    assert str(quick_study.resolve() / "classifier.pt") not in report
    data = json.loads((quick_study / "report" / "study_data.json").read_text())  # what the numbers come from
    assert data["scores"] == got and data["runs"]["mvar-s0"]["evaluations"][-1] == clock
    assert data["runs"]["var-s0"]["train/Lm"][0] and str(quick_study.resolve()) not in json.dumps(data)
    # a review: nothing said which code made a published study
    assert data["code"] == study_report.code_version() and f"with the code of {data['code']}:" in report
    assert re.fullmatch(r"[0-9a-f]{12}(\+changes)?", data["code"]) and data["plan"]["recipe"]["tokenizer"]
    for png in ("study_loss.png", "study_fd.png", "study_samples.png", "study_curves.png"):
        with Image.open(quick_study / "report" / png) as im:
            assert im.width > 300 and im.height > 200
        assert f"]({png})" in report


def jobs_run(proc: subprocess.CompletedProcess) -> list[str]:
    return [line.split("job ")[1].split()[0] for line in proc.stdout.splitlines() if "INFO study] job " in line]


def test_quick_study_rerun_redoes_only_what_is_missing(quick_study):
    """One re-run after three interruptions: var-s0 killed while scoring (only its scoring is redone), intra-s0 killed
    while sampling (its sampling and scoring are redone, not its training), mvar-s0 finished under an older FLOP
    count (counted again, not re-trained). Same weights, same seeds: the same images and scores."""
    before = scores(quick_study)
    ckpts = {run: quick_study / "runs" / run / "ar-ckpt-last.pth" for run in ("var-s0", "intra-s0")}
    ckpt_stamps = {run: path.stat().st_mtime_ns for run, path in ckpts.items()}
    scored_images = quick_study / "sets" / "var-s0.npz"
    images_stamp = scored_images.stat().st_mtime_ns
    for run in ckpts:
        (quick_study / "scores" / f"{run}.json").unlink()
    (quick_study / "sets" / "intra-s0.npz").unlink()
    timing_path = quick_study / "runs" / "mvar-s0" / "timing.json"
    timing = json.loads(timing_path.read_text())
    assert timing["flops_count"] == COUNT_VERSION
    stale = {**timing, "train_flops_per_image": 1.0, "sample_flops_per_image": 2.0}
    timing_path.write_text(json.dumps({k: v for k, v in stale.items() if k != "flops_count"}))  # an older count's
    proc = run_study(quick_study)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert sorted(jobs_run(proc)) == ["intra-s0", "var-s0"]
    assert {run: path.stat().st_mtime_ns for run, path in ckpts.items()} == ckpt_stamps  # no training redone
    assert scored_images.stat().st_mtime_ns == images_stamp and (quick_study / "sets" / "intra-s0.npz").is_file()
    assert scores(quick_study) == before
    assert json.loads(timing_path.read_text()) == timing  # a finished run's FLOPs counted again, not re-trained


def test_study_on_a_base_reuses_its_tokenizer_and_reference_rows(quick_study, tmp_path):
    out = tmp_path / "longer"
    proc = run_study(out, f"--base={quick_study}", "--rows", "var", "--ep=1")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert jobs_run(proc) == ["var-s0"]  # and no tokenizer, classifier or reference sets
    assert not (out / "tokenizer" / "tokenizer-last.pth").exists()
    assert json.loads((out / "plan.json").read_text())["tokenizer"] == \
        json.loads((quick_study / "plan.json").read_text())["tokenizer"]
    base = scores(quick_study)
    got = scores(out)
    assert set(got) == {"floor", "ceiling", "var-s0"}
    assert got["floor"] == base["floor"] and got["ceiling"] == base["ceiling"]
    assert got["var-s0"] != base["var-s0"]  # VAR trained two epochs (twice --ep) instead of four
    report = (out / "report" / "study.md").read_text()
    assert f"study in `{quick_study}`" in report and "| VAR |" in report and "| M-VAR |" not in report


def study_in_process(out, *flags: str):
    return study.main(study.build_parser().parse_args(["--quick", f"--out_dir={out}", *flags]))


@pytest.mark.parametrize("flag", ["--width=96", "--num_samples=15", "--seeds=0", "--inception_n=1", "--jobs=0",
                                  "--train_limit=60001",  # Fashion-MNIST's 60,000: the report counted the flag
                                  "--tlr=nan", "--tlr=inf", "--tlr=0.0"])  # nan passed `tlr < 1e-9`, inf too
def test_study_refuses_bad_settings_before_any_work(tmp_path, flag):
    with pytest.raises(ValueError, match=re.escape(flag)):
        study_in_process(tmp_path / "study", flag)
    assert not (tmp_path / "study").exists()


def test_an_unwritable_report_dir_is_refused_before_any_work(tmp_path, monkeypatch):
    """A review: --report_dir was first written after the whole study (hours), and failed there."""
    monkeypatch.setattr(study, "fashion_mnist_dir", lambda *a: tmp_path)  # whether the data set is here or not
    monkeypatch.setattr(study, "prepare", lambda *a: pytest.fail("work started before the check"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=re.escape(f"--report_dir={tmp_path / 'file' / 'report'}: cannot write")):
        study_in_process(tmp_path / "study", "--inception_n=0", f"--report_dir={tmp_path / 'file' / 'report'}")
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize("flags, message", [
    (["--seeds=0"], "error: bad study settings: --seeds=0 (expected >= 1)"),
    (["--jobs=0"], "error: --jobs=0: expected at least 1"),
    (["--num_samples=7"], "error: bad study settings: --num_samples=7 (expected >= 10), --num_samples=7 (expected a "
                          "multiple of 10)"),
    (["--inception_n=0", "--fmnist_dir=/nonexist"], "error: Fashion-MNIST: /nonexist lacks "),
])
def test_the_cli_ends_a_bad_flag_in_one_error_line(flags, message, tmp_path):
    """A review: these ended in tracebacks (the script caught none of its own errors); `cli` is what running the
    script calls."""
    with pytest.raises(SystemExit) as e:
        study.cli(["--quick", f"--out_dir={tmp_path / 'study'}", *flags])
    assert str(e.value).startswith(message) and "\n" not in str(e.value), e.value
    assert not (tmp_path / "study").exists()
    assert "\n    cli()\n" in STUDY.read_text()


def test_quick_study_refuses_other_settings_in_the_same_folder(quick_study):
    with pytest.raises(ValueError, match=re.escape("holds a study made with other settings (preset, runs differ)")):
        study_in_process(quick_study, "--seeds=2")
    assert not (quick_study / "runs" / "var-s1").exists()


def test_a_folder_of_another_recipe_is_refused(tmp_path, monkeypatch):
    """A review: the training flags and the tokenizer's sizes were not part of the compared plan, so a study resumed
    after they changed in the code would mix runs trained two ways."""
    plan = study.make_plan(study.build_parser().parse_args(["--quick"]))
    study.save_json(plan, tmp_path / "plan.json")
    study.check_folder(tmp_path, plan)
    # a folder made before the recipe was compared (train_flags and tokenizer_config written by `prepare`) resumes
    older = {k: v for k, v in plan.items() if k != "recipe"}
    older.update(train_flags=[*study.TRAIN_FLAGS, "--pn=1_2"], tokenizer_config=study.TOKENIZER)
    study.save_json(older, tmp_path / "plan.json")
    study.check_folder(tmp_path, plan)
    monkeypatch.setattr(study, "TRAIN_FLAGS", [*study.TRAIN_FLAGS, "--alng=1e-4"])
    with pytest.raises(ValueError, match="other settings \\(recipe differ\\)"):
        study.check_folder(tmp_path, study.make_plan(study.build_parser().parse_args(["--quick"])))


def test_curves_jobs_run_costliest_first():
    """VAR's runs (twice the epochs) and M-VAR's start before the lighter equal-parameter rows, so that the last job
    running alone is a short one (the order of the seeds does not decide it)."""
    plan = study.make_plan(study.build_parser().parse_args(["--curves"]))
    assert plan["runs"]["var-s0"]["ep"] == 2 * plan["runs"]["mvar-s0"]["ep"]
    assert study.job_order(plan) == ["mvar-s0", "mvar-s1", "var-s0", "var-s1", "mvar-d-s0", "mvar-w-s0"]


def test_report_points_to_the_early_training_view_when_it_is_there(tmp_path):
    assert study_report.early_view(tmp_path) == ""
    (tmp_path / "study-early").mkdir()
    (tmp_path / "study-early" / "study.md").write_text("# early\n")
    assert "[study-early/study.md](study-early/study.md)" in study_report.early_view(tmp_path)


def test_curves_plan_evaluates_the_equal_parameter_rows_once():
    """--curves: VAR and M-VAR evaluated every epoch (the curves), M-VAR-W and M-VAR-D only at their end (they are
    compared at the largest budget), none when evaluations are off."""
    plan = study.make_plan(study.build_parser().parse_args(["--curves"]))
    assert {r: spec["eval_every"] for r, spec in plan["runs"].items()} == {
        "var-s0": 1, "var-s1": 1, "mvar-s0": 1, "mvar-s1": 1, "mvar-w-s0": 12, "mvar-d-s0": 12}
    off = study.make_plan(study.build_parser().parse_args(["--curves", "--eval_every=0"]))
    assert {spec["eval_every"] for spec in off["runs"].values()} == {0}
    assert "M-VAR-W" in study_report.evaluations(plan) and "once, at the end" in study_report.evaluations(plan)


@pytest.mark.parametrize("preset", ["--quick", "--curves", "--seeds=2"])  # the last: the default preset
def test_every_preset_may_evaluate_inside_its_runs(preset):
    """--eval_every on the default preset planned evaluations of no size: a KeyError once the tokenizer had trained."""
    plan = study.make_plan(study.build_parser().parse_args([preset, "--eval_every=1"]))
    flags = study.eval_flags(plan, Path("classifier.pt"))
    assert f"--eval_n={plan['preset']['eval_n']}" in flags and plan["preset"]["eval_n"] >= 10
    assert study.eval_flags(study.make_plan(study.build_parser().parse_args([preset, "--eval_every=0"])),
                            Path("classifier.pt")) == []


def test_a_default_preset_folder_from_before_its_evaluation_size_resumes(tmp_path):
    """A review: giving the default preset an eval_n changed its plan, so its folders from before were refused."""
    plan = study.make_plan(study.build_parser().parse_args([]))
    older = json.loads(json.dumps(plan))
    del older["preset"]["eval_n"]
    study.save_json(older, tmp_path / "plan.json")
    study.check_folder(tmp_path, plan)
    study.save_json(dict(older, preset=dict(older["preset"], ep=4)), tmp_path / "plan.json")
    with pytest.raises(ValueError, match="preset differ"):
        study.check_folder(tmp_path, plan)


def test_a_base_may_differ_only_in_the_tokenizers_validation_size():
    """--base compares the tokenizer's training flags without --val_limit (it sizes a logged check, not weights)."""
    preset = study.PRESETS["curves"]
    assert study.base_settings(preset) == study.base_settings(
        dict(preset, tok=[f for f in preset["tok"] if not f.startswith("--val_limit")]))
    assert study.base_settings(preset) != study.base_settings(dict(preset, tok=[*preset["tok"], "--steps=600"]))


def test_a_row_evaluated_once_past_the_other_rows_last_point_is_not_compared():
    one = {"minutes": np.array([40.0]), "fd_clf": np.array([3.0])}
    var = {"minutes": np.array([1.0, 30.0]), "fd_clf": np.array([9.0, 3.5])}
    assert study_curves.comparison_points([one], [var], "minutes") == []
    assert study_curves.comparison_points([dict(one, minutes=one["minutes"] - 15)], [var], "minutes") == [25.0]


def test_every_axis_is_compared_at_the_same_fractions_of_the_budget():
    """A review: images were compared at a quarter, half and all of M-VAR's budget, FLOPs and time at half and all
    only, so the early points, where M-VAR leads per image and VAR per FLOP and per minute, came from one axis."""
    mvar = {"images": np.array([100.0, 400.0]), "flops": np.array([150.0, 600.0]), "minutes": np.array([2.0, 8.0])}
    var = {"images": np.array([100.0, 800.0]), "flops": np.array([100.0, 800.0]), "minutes": np.array([1.0, 8.0])}
    assert [study_curves.comparison_points([mvar], [var], axis) for axis in ("images", "flops", "minutes")] == [
        [100.0, 200.0, 400.0], [150.0, 300.0, 600.0], [2.0, 4.0, 8.0]]


def test_published_verdicts_are_reread_from_study_data(capsys):
    """docs/study.md's verdicts are what `python -m scripts.study_curves docs/study_data.json` prints with this code:
    a change of the comparison rules must re-read them."""
    study_curves.main([str(REPO / "docs" / "study_data.json")])
    printed = capsys.readouterr().out.strip().splitlines()
    report = (REPO / "docs" / "study.md").read_text()
    assert len(printed) > 10 and all(line in report for line in printed)


def test_verdicts_need_a_significant_welch_test_and_cover_the_whole_ordering():
    """Two seeds a side: a lead of about the seeds' spread is "ahead, not significant" (the old rule called
    0.30 against a 0.17 spread "better"), a lead of many spreads "better"; one seed is untested. The reading checks
    every ordering of Table 6, so a baseline beating another against the paper is reported as not reproduced."""
    assert study_curves.who_leads([3.60, 3.62], [3.90, 3.92], "M-VAR", "VAR") == \
        (True, "**M-VAR better** (difference -0.30, Welch t = -21.2, p = 0.002, 2 vs 2 seeds)")
    better, words = study_curves.who_leads([3.53, 3.69], [3.83, 3.99], "M-VAR", "VAR")
    assert better is None and \
        words == "M-VAR ahead, not significant (difference -0.30, Welch t = -2.7, p = 0.118, 2 vs 2 seeds)"
    assert study_curves.who_leads([3.0], [3.5, 3.6], "a", "b")[0] is None
    assert study_curves.who_leads([3.0, 3.2], [3.2, 3.0], "a", "b") == (None, "level (both 3.10)")
    assert study_curves.who_leads([math.nan, 3.2], [3.0, 3.1], "a", "b")[1].startswith("untested (a score is not")
    rows = {k: dict(label=k.upper(), images=100, scores=[{"fd_clf": v} for v in fd])
            for k, fd in dict(mvar=[3.60, 3.62], var=[25.6, 25.8], mamba=[22.9, 23.1], intra=[25.6, 25.9]).items()}
    text = study_report.reading(rows)
    assert "- Table 6: M-VAR better than VAR: reproduced (MVAR 3.61 vs VAR 25.70; **MVAR better**" in text
    assert "- Table 6: VAR better than Mamba alone: **not reproduced** (VAR 25.70 vs MAMBA 23.00; **MAMBA better**" \
        in text
    assert "- Table 6: VAR better than intra-scale attention alone: same direction, not significant" in text
    one_seed = dict(mvar=rows["mvar"], var=dict(rows["var"], scores=[{"fd_clf": 3.0}]))  # VAR ahead, no test ran
    assert "- Table 6: M-VAR better than VAR: not reproduced (opposite direction, untested) (MVAR 3.61 vs VAR 3.00; " \
        "VAR ahead, untested" in study_report.reading(one_seed)
    # the paper's claims are at equal training: a final table of other budgets (VAR trained twice the images, as
    # the curves preset does) is no verdict, whatever the test says
    unequal = dict(rows, var=dict(rows["var"], images=200))
    assert "- Table 6: M-VAR better than VAR: not judged here: unequal budgets (100 vs 200 training images; the " \
        "curves above compare them at equal images, FLOPs and time) (MVAR 3.61 vs VAR 25.70; **MVAR better**" \
        in study_report.reading(unequal)


def test_a_claim_not_judged_for_unequal_budgets_does_not_enlarge_the_holm_family():
    """Only the claims tested on this table share its Holm family: a pair of unequal budgets runs no test. Counted
    in, it doubled the equal pair's p (0.038 -> 0.075) and a reproduced claim read as not significant."""
    rows = {k: dict(label=k.upper(), images=100, scores=[{"fd_clf": v} for v in fd])
            for k, fd in dict(mvar=[3.60, 3.66, 3.72], var=[3.75, 3.81, 3.87]).items()}
    rows["mvar-d"] = dict(rows["mvar"], label="MVAR-D", images=200)  # Table 5's claim against VAR: unequal budgets
    text = study_report.reading(rows)
    assert "- Table 6: M-VAR better than VAR: reproduced (MVAR 3.66 vs VAR 3.81; **MVAR better**" in text, text
    assert "p = 0.038, 3 vs 3 seeds" in text and "M-VAR-D (VAR's params) better than VAR: not judged here" in text


def test_the_tests_of_one_pair_are_a_family_under_holms_adjustment():
    """Seven points of one pair (the same runs) are seven tests: "better" needs the Holm-adjusted p below 0.05.
    p = 0.01 alone among seven is 0.07 adjusted: ahead, not significant; one seed a side runs no test."""
    assert study_curves.holm([0.01, None, 0.04, 0.03]) == pytest.approx([0.03, None, 0.06, 0.06])
    assert study_curves.holm([0.2, 0.5]) == pytest.approx([0.4, 0.5])  # step-down: never below an earlier one
    a, b = [3.60, 3.70], [3.90, 3.98]
    p = study_curves.welch_p(a, b)
    assert 0.005 < p < 0.05 and study_curves.who_leads(a, b, "M-VAR", "VAR")[0] is True
    better, words = study_curves.who_leads(a, b, "M-VAR", "VAR", family=(min(7 * p, 1.0), 7))
    assert better is None and "M-VAR ahead, not significant" in words and "Holm over 7 tests" in words
    assert study_curves.welch_p([3.0], [3.5, 3.6]) is None and study_curves.welch_p([3.0, 3.2], [3.2, 3.0]) is None
    # the claims read off one final table (which share its runs) are a family too
    rows = {k: dict(label=k.upper(), images=100, scores=[{"fd_clf": v} for v in fd])
            for k, fd in dict(mvar=a, var=b, intra=[3.95, 4.06]).items()}
    assert "- Table 6: M-VAR better than VAR: same direction, not significant (MVAR 3.65 vs VAR 3.94; MVAR ahead, " \
        "not significant (difference -0.29, Welch t = -4.5, p = 0.050, 2 vs 2 seeds; Holm over 3 tests: p = 0.126))" \
        in study_report.reading(rows)


def test_welch_matches_the_textbook_t_and_satterthwaite_degrees_of_freedom():
    """Unequal seeds and spreads: t = (mean a - mean b) / sqrt(s_a^2/n_a + s_b^2/n_b), df by Welch-Satterthwaite,
    two-sided p. Student's pooled test (p 0.048 here: "better") or a one-sided p passed the suite, whose cases have
    equal seeds and spreads. One side's seeds agreeing exactly still runs the test (df 1)."""
    from scipy import stats

    a, b = [3.1, 3.3, 3.2], [3.6, 4.1]
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 2
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 1)
    got_t, got_p = study_curves.welch(a, b)
    assert got_t == pytest.approx(t, rel=1e-12) and got_p == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9)
    assert 0.2 < got_p < 0.25 and study_curves.who_leads(a, b, "M-VAR", "VAR")[0] is None
    got_t, got_p = study_curves.welch([3.0, 3.0], [3.5, 3.7])  # t = -0.6 / sqrt(0 + 0.02 / 2), df = 1
    assert got_t == pytest.approx(-6.0, rel=1e-12) and got_p == pytest.approx(2 * stats.t.sf(6.0, 1), rel=1e-9)


def test_holm_caps_adjusted_p_values_at_one():
    """(m - k) * p is capped at 1 (a probability): [0.6, 0.7] adjust to [1, 1], not [1.2, 1.2] in the report."""
    assert study_curves.holm([0.6, 0.7]) == [1.0, 1.0]


def test_a_lead_is_better_only_below_the_level():
    """"Better" needs p below 0.05: an adjusted p of exactly 0.05 (0.025 twice, Holm) or of 0.07 is "not
    significant"; 0.049 is "better". A rule of p <= 0.1, or <= 0.05, passed the suite (its p values are 0.002,
    0.118 and about 0.35)."""
    a, b = [3.60, 3.62], [3.90, 3.92]  # raw p 0.002
    for p, better in ((0.049, True), (0.05, None), (0.07, None)):
        assert study_curves.who_leads(a, b, "M-VAR", "VAR", family=(p, 2))[0] is better, p


def test_learned_needs_both_the_consistency_and_the_fd_threshold():
    """A row has learned at class consistency >= 0.80 and FD_clf <= 2.5x the ceiling's, both at once (boundaries
    included); either alone passed the suite."""
    def reading(cons, fd):
        rows = {"var": dict(label="VAR", scores=[{"consistency": cons, "fd_clf": fd}])}
        return study_curves.learned(rows, ceiling_fd=2.0)

    assert reading(0.80, 5.0).endswith(": learned.")
    for cons, fd in ((0.79, 5.0), (0.80, 5.01), (0.5, 9.0)):
        assert reading(cons, fd).endswith(": **not yet learned**."), (cons, fd)


def test_a_rows_training_images_count_every_epoch_padded_to_whole_batches():
    """The table's and the claims' training budget: each epoch of 1,000 images in batches of 64 is 16 batches,
    1,024 images (the sampler pads the last one). Counting the unpadded images passed the suite, and made rows
    with other batch sizes look unequal (or equal) in budget."""
    assert study_report.train_images({"train_limit": 1000, "bs": 64}, 3) == 3 * 1024
    assert study_report.train_images({"train_limit": 1024, "bs": 64}, 2) == 2048


def test_a_rows_throughput_is_its_first_seeds_and_the_seed_count_is_the_plans(tmp_path):
    """train img/s is the --first_seed run's (images over its training clock; later seeds may share the machine),
    and the report says how many seeds the plan ran. The last seed's clock, or a fixed seed count, passed the
    suite (the quick study runs one seed)."""
    plan = {"preset": {"first_seed": 3, "bs": 8, "train_limit": 16}, "rows": {"var": {"label": "VAR", "params": 1}},
            "runs": {f"var-s{s}": {"row": "var", "seed": s, "ep": 1} for s in (3, 4, 5)}}
    for seed, train_s in ((3, 4.0), (4, 8.0), (5, 2.0)):
        (run := tmp_path / "runs" / f"var-s{seed}").mkdir(parents=True)
        (run / "curve.json").write_text(json.dumps([{"images": 16, "train_s": train_s}]))
    assert study_report.collect(tmp_path, plan, {r: {} for r in plan["runs"]})["var"]["train_images_per_s"] == 4.0
    assert study_report.seeds_text(plan) == "3 seeds per row"
    plan["runs"] = {"var-s3": plan["runs"]["var-s3"]}
    assert study_report.seeds_text(plan) == "1 seed per row"


def test_a_family_counts_only_the_tests_that_ran():
    """`families` gives who_leads (Holm-adjusted p, tests that ran): counting the tests that did not run (one seed on
    a side, unequal budgets) in N of "Holm over N tests", or calling one test that ran alone a family, passed the
    suite."""
    assert study_curves.families([0.01, None, 0.04]) == [(0.02, 2), None, (0.04, 2)]
    assert study_curves.families([0.01, None, None]) == [None, None, None]


def test_flops_per_image_are_one_images_training_step_and_cfg_sample():
    """timing.json's FLOPs per image (the curves' FLOP axis, the table's columns) are one image's training step
    (forward and backward, models/flops.py) and one image's cfg sampling. The count of the 10 images not divided,
    the forward alone, or half the sampling passed the suite: the quick study checks only that a FLOP axis exists."""
    import torch
    from conftest import build_tiny_mvar
    from models.flops import model_flops, train_step_flops

    _, mvar = build_tiny_mvar(arch="mvar")
    s = dict(cfg=1.5, top_k=5, top_p=0.96)
    got = study.flops_per_image(mvar.eval(), s)
    x_BLCv = torch.randn(1, mvar.L - mvar.first_l, mvar.Cvae)
    with torch.inference_mode():
        one_sample = model_flops(mvar, lambda: mvar.autoregressive_infer_cfg(1, torch.arange(1), g_seed=0, **s))
    assert got == dict(train_flops_per_image=train_step_flops(mvar, torch.arange(1), x_BLCv),
                       sample_flops_per_image=one_sample, flops_count=COUNT_VERSION)


def test_the_flop_axis_and_the_table_read_the_training_flops(tmp_path):
    """The curves' FLOP axis is images x training FLOPs per image, and the table's GFLOP/img columns are training and
    sampling, each from its field of timing.json. Reading the sampling field for the axis or the training column
    passed the suite, the quick study included."""
    timing = {"train_flops_per_image": 3e9, "sample_flops_per_image": 7e9, "sample_images_per_s": 2.0}
    plan = {"runs": {"var-s0": {"row": "var"}}, "preset": {"inception_n": 10}}
    (run := tmp_path / "runs" / "var-s0").mkdir(parents=True)
    (run / "timing.json").write_text(json.dumps(timing))
    (run / "curve.json").write_text(json.dumps([{"images": n, "train_s": 30.0 * n, "fd_clf": 5.0, "consistency": 0.5}
                                                for n in (100, 200)]))
    assert study_curves.collect_curves(tmp_path, plan)["var"][0]["flops"].tolist() == [3e11, 6e11]
    score = {"fd_clf": 5.0, "is_clf": 9.0, "precision": 0.9, "recall": 0.9, "consistency": 0.95}
    (tmp_path / "scores").mkdir()
    for key in study_report.REFERENCE_ROWS:
        (tmp_path / "scores" / f"{key}.json").write_text(json.dumps(score))
    rows = {"var": dict(label="VAR", params=2e6, images=200, scores=[score], timings=[timing], train_images_per_s=10.0)}
    line = next(line for line in study_report.table(tmp_path, rows, plan).splitlines() if line.startswith("| VAR |"))
    assert line.split(" | ")[3:5] == ["3.00", "7.00"]


def test_every_table_cell_is_read_from_its_own_field(tmp_path):
    """study.md's table, a value per field (none shared, so no two columns can trade): the reference rows'
    precision and recall, a row's training minutes (images / img/s / 60), sampling img/s (the mean over the
    timings), the first seed's Inception FID, IS_clf and the other means; every line has the header's 14 cells, an
    unfinished row too. A mutation review: precision and recall swapped, hours for minutes, the last timing's
    speed, the IS_clf column dropped passed the suite (its cases share values between columns)."""
    (tmp_path / "scores").mkdir()
    floor = dict(fd_clf=1.25, fid_inception=12.34, is_clf=9.5, precision=0.812, recall=0.634, consistency=0.975)
    ceiling = dict(fd_clf=2.5, is_clf=8.25, precision=0.701, recall=0.523, consistency=0.912)
    for key, score in (("floor", floor), ("ceiling", ceiling)):
        (tmp_path / "scores" / f"{key}.json").write_text(json.dumps(score))
    seeds = [dict(fd_clf=4.0, fid_inception=33.33, is_clf=8.0, precision=0.6, recall=0.3, consistency=0.9),
             dict(fd_clf=5.0, is_clf=9.0, precision=0.7, recall=0.5, consistency=0.8)]
    timings = [dict(train_flops_per_image=3e9, sample_flops_per_image=7e9, sample_images_per_s=s) for s in (2.0, 4.0)]
    rows = {"mvar": dict(label="M-VAR", params=2.5e6, images=1200, scores=seeds, timings=timings,
                         train_images_per_s=10.0),
            "var": dict(label="VAR", params=1e6, images=1200, scores=[], timings=[], train_images_per_s=math.nan)}
    lines = study_report.table(tmp_path, rows, {"preset": {"inception_n": 10}}).splitlines()
    assert lines[2:] == [
        "| real training images (floor) | | | | | | | | 1.25 | 12.3 | 9.50 | 0.812 | 0.634 | 0.975 |",
        "| tokenizer reconstructions (ceiling) | | | | | | | | 2.50 | - | 8.25 | 0.701 | 0.523 | 0.912 |",
        "| M-VAR | 2.50 | 1,200 | 3.00 | 7.00 | 10.0 | 2.0 | 3.0 | 4.50 ± 0.50 | 33.3 | 8.50 | 0.650 | 0.400 | 0.850 |",
        "| VAR | 1.00 | not finished |" + " |" * 11]
    assert lines[0].count("|") == 15 and all(line.count("|") == 15 for line in lines[2:]), lines


def test_the_reading_ranks_by_mean_fd_and_names_each_claims_rows_in_the_papers_order():
    """Rows ordered as the paper finds them (M-VAR < M-VAR-W < M-VAR-D < half VAR < VAR < Mamba < intra-scale
    attention, each many seeds' spreads apart) reproduce every claim, ranked best first. A mutation review: the
    ranking reversed, and Table 6's Mamba-over-intra and Figure 5's claims tested the wrong way round (then "not
    reproduced" where the paper holds) passed the suite."""
    fd = {"mvar": [3.00, 3.02], "mvar-w": [3.50, 3.52], "mvar-d": [3.60, 3.62], "var-half": [3.70, 3.72],
          "var": [4.00, 4.02], "mamba": [5.00, 5.02], "intra": [6.00, 6.02]}
    rows = {k: dict(label=k.upper(), images=100, scores=[{"fd_clf": v} for v in f]) for k, f in fd.items()}
    lines = study_report.reading(rows).splitlines()
    assert lines[0] == "Ranking by mean FD_clf (lower is better): MVAR 3.01, MVAR-W 3.51, MVAR-D 3.61, " \
        "VAR-HALF 3.71, VAR 4.01, MAMBA 5.01, INTRA 6.01."
    claims = [("Table 6: M-VAR better than VAR", "MVAR 3.01 vs VAR 4.01"),
              ("Table 6: M-VAR better than intra-scale attention alone", "MVAR 3.01 vs INTRA 6.01"),
              ("Table 6: M-VAR better than Mamba alone", "MVAR 3.01 vs MAMBA 5.01"),
              ("Table 6: VAR better than Mamba alone", "VAR 4.01 vs MAMBA 5.01"),
              ("Table 6: VAR better than intra-scale attention alone", "VAR 4.01 vs INTRA 6.01"),
              ("Table 6: Mamba alone better than intra-scale attention alone", "MAMBA 5.01 vs INTRA 6.01"),
              ("Table 5: M-VAR-W (VAR's params) better than VAR", "MVAR-W 3.51 vs VAR 4.01"),
              ("Table 5: M-VAR-D (VAR's params) better than VAR", "MVAR-D 3.61 vs VAR 4.01"),
              ("Figure 5: replacing VAR blocks by M-VAR blocks helps", "VAR-HALF 3.71 vs VAR 4.01")]
    assert [line.split("; ")[0] for line in lines[1:]] == [f"- {claim}: reproduced ({both}" for claim, both in claims]
    assert all("Holm over 9 tests" in line for line in lines[1:])


def test_the_budget_sentence_counts_epochs_over_the_training_images():
    """Equal budgets: images and epochs (images / --train_limit); unequal: each row's images. A mutation review:
    epochs counted in batches (images / bs) passed the suite."""
    preset = {"train_limit": 1200, "bs": 64}
    same = {k: dict(label=k, images=4800) for k in ("VAR", "M-VAR")}
    assert study_report.budgets(same, preset) == \
        "**equal training images** (4,800 = 4 epochs over the first 1,200 training images)"
    assert study_report.budgets(dict(same, VAR=dict(label="VAR", images=9600)), preset) == \
        "training images per row (VAR 9,600, M-VAR 4,800; epochs over the first 1,200 training images)"


def test_the_learned_reading_compares_with_the_ceilings_fd(tmp_path, monkeypatch):
    """The learning-curves section judges "learned" against the tokenizer reconstructions' FD_clf (the ceiling),
    not the real images' (the floor). A mutation review: the floor's read there passed the suite."""
    monkeypatch.setattr(study_report, "plot_curves", lambda *a: None)
    (tmp_path / "scores").mkdir()
    for key, fd_clf in (("floor", 1.0), ("ceiling", 2.0)):
        (tmp_path / "scores" / f"{key}.json").write_text(json.dumps({"fd_clf": fd_clf}))
    (run := tmp_path / "runs" / "var-s0").mkdir(parents=True)
    (run / "timing.json").write_text(json.dumps({"train_flops_per_image": 1e9}))
    (run / "curve.json").write_text(json.dumps([{"images": 100, "train_s": 60.0, "fd_clf": 6.0, "consistency": 0.5}]))
    plan = {"preset": {"eval_every": 1, "eval_n": 10, "val_limit": 100}, "rows": {"var": {"label": "VAR"}},
            "runs": {"var-s0": {"row": "var"}}}
    rows = {"var": dict(label="VAR", scores=[{"consistency": 0.9, "fd_clf": 4.5}])}
    text = study_report.curves_section(tmp_path, rows, plan, tmp_path)
    assert "- VAR: class consistency 0.900 (needed >= 0.80), FD_clf 4.50 = 2.2x the ceiling's 2.00 (needed <= 2.5x): " \
        "learned." in text


def test_curves_reread_from_study_data_skip_a_run_without_its_timing():
    """A run of study_data.json without timing.json (its FLOP axis unknown) has no curve, as in the work folder.
    A mutation review: reading it anyway (a TypeError on None) passed the suite."""
    points = [{"images": n, "train_s": 6.0 * n, "fd_clf": 5.0, "consistency": 0.5} for n in (100, 200)]
    data = {"plan": {"runs": {"var-s0": {"row": "var"}, "var-s1": {"row": "var"}, "mvar-s0": {"row": "mvar"}}},
            "runs": {"var-s0": {"evaluations": points, "timing": {"train_flops_per_image": 2.0}},
                     "var-s1": {"evaluations": points, "timing": None}, "mvar-s0": {"evaluations": [], "timing": {}}}}
    curves = study_curves.curves_from_data(data)
    assert list(curves) == ["var"] and len(curves["var"]) == 1
    assert curves["var"][0]["flops"].tolist() == [200.0, 400.0] and curves["var"][0]["minutes"].tolist() == [10.0, 20.0]


def test_an_axis_on_which_the_curves_do_not_overlap_says_so():
    """verdicts: a pair's axis without a common point says "the curves do not overlap" instead of nothing. A
    mutation review: dropping that line (the axis then missing from the report) passed the suite."""
    def curve(images, minutes):
        return dict(images=np.array(images), flops=np.array(images) * 1e9, minutes=np.array(minutes),
                    fd_clf=np.array([6.0, 5.0]), consistency=np.array([0.5, 0.6]))

    rows = {"mvar": dict(label="M-VAR"), "var": dict(label="VAR")}
    curves = {"mvar": [curve([100.0, 200.0], [1.0, 2.0])], "var": [curve([100.0, 200.0], [3.0, 4.0])]}
    lines = study_curves.verdicts(rows, curves).splitlines()
    assert lines[0] == "- **M-VAR vs VAR**" and lines[-1] == "  - at equal training time on this CPU: the curves do " \
        "not overlap."
    assert len(lines) == 1 + 2 + 2 + 1  # half and all of the budget on images and FLOPs (a quarter: no curve yet)
