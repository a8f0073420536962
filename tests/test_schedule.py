"""VAR's lr / wd / progressive schedules at chosen iterations, and the flag derivations of utils.flags."""
import ast
import math
from pathlib import Path

import pytest
import torch

from models.presets import MVAR_models
from utils.flags import build_parser, finalize_args, parse_args
from utils.run.schedule import Schedule, lr_factor, prog_si_at, prog_state, set_lr_wd, wd_at

WP0, WPE = 0.005, 0.1


def test_warmup_is_linear_from_wp0():
    wp_it, max_it = 100, 1000
    assert lr_factor("lin0", 0, wp_it, max_it, WP0, WPE) == WP0
    assert lr_factor("lin0", 50, wp_it, max_it, WP0, WPE) == pytest.approx(WP0 + (1 - WP0) * 0.5)
    assert lr_factor("lin0", 99, wp_it, max_it, WP0, WPE) == pytest.approx(WP0 + (1 - WP0) * 0.99)


def test_lin0_holds_5_percent_then_decays_linearly_to_wpe():
    wp_it, max_it = 100, 1101  # 1000 post-warm-up steps (p = (it - 100) / 1000)
    assert lr_factor("lin0", 100, wp_it, max_it, WP0, WPE) == 1.0
    assert lr_factor("lin0", 149, wp_it, max_it, WP0, WPE) == 1.0  # p = 0.049
    p = 0.5
    assert lr_factor("lin0", 600, wp_it, max_it, WP0, WPE) == pytest.approx(WPE + (1 - WPE) * (1 - p) / 0.95)
    assert lr_factor("lin0", 1100, wp_it, max_it, WP0, WPE) == pytest.approx(WPE)


@pytest.mark.parametrize("sche,p,expected", [
    ("cos", 0.5, WPE + (1 - WPE) * 0.5),
    ("lin00", 0.25, WPE + (1 - WPE) * 0.75),
    ("lin", 0.1, 1.0),
    ("lin", 0.5, WPE + (1 - WPE) * 0.5 / 0.85),
    ("exp", 1.0, WPE),
    ("lin0.5", 0.25, 1 + ((1 + WPE + (1 - WPE) * 0.5) / 2 - 1) * 0.5),
    ("lin0.5", 1.0, WPE),
    ("const", 1.0, 1.0),  # taming-transformers' VQGAN trains at a constant lr
])
def test_other_schedules(sche, p, expected):
    wp_it, max_it = 10, 211  # 200 post-warm-up steps
    assert lr_factor(sche, 10 + round(p * 200), wp_it, max_it, WP0, WPE) == pytest.approx(expected)


def test_cos_decays_from_the_peak_to_wpe():
    """cos: a half cosine from 1 at the end of warm-up to wpe at the last iteration (a quarter of the way: 0.854 of
    the span). The mid-point alone, where a rising and a falling half cosine meet, let a flipped sign through."""
    wp_it, max_it = 10, 211  # 200 post-warm-up steps
    assert lr_factor("cos", 10, wp_it, max_it, WP0, WPE) == pytest.approx(1.0, rel=1e-12)
    quarter = WPE + (1 - WPE) * (0.5 + 0.5 * math.cos(math.pi / 4))
    assert lr_factor("cos", 60, wp_it, max_it, WP0, WPE) == pytest.approx(quarter, rel=1e-12)
    assert lr_factor("cos", 210, wp_it, max_it, WP0, WPE) == pytest.approx(WPE, rel=1e-12)


def test_exp_holds_15_percent_then_decays_exponentially_to_wpe():
    """VAR's exp schedule: the peak lr through the first 15% after warm-up, then exp((p - 0.15) / 0.85 * log wpe),
    so wpe ** 0.5 halfway through the decay (not a decay from p = 0, which the endpoint test alone let through)."""
    wp_it, max_it = 10, 211  # 200 post-warm-up steps (p = (it - 10) / 200)
    assert lr_factor("exp", 10, wp_it, max_it, WP0, WPE) == 1.0
    assert lr_factor("exp", 30, wp_it, max_it, WP0, WPE) == 1.0  # p = 0.1
    assert lr_factor("exp", 39, wp_it, max_it, WP0, WPE) == 1.0  # p = 0.145
    assert lr_factor("exp", 125, wp_it, max_it, WP0, WPE) == pytest.approx(WPE**0.5, rel=1e-12)  # p = 0.575


def test_unknown_schedule_names_the_flag():
    with pytest.raises(ValueError, match="--sche"):
        lr_factor("step", 50, 10, 100)


def test_weight_decay_half_cosine():
    assert wd_at(0, 101, 0.05, 0.08) == pytest.approx(0.05)
    assert wd_at(50, 101, 0.05, 0.08) == pytest.approx(0.065)
    assert wd_at(100, 101, 0.05, 0.08) == pytest.approx(0.08)
    assert wd_at(25, 101, 0.05, 0.08) == pytest.approx(0.08 + (0.05 - 0.08) * (0.5 + 0.5 * math.cos(math.pi / 4)))


def test_set_lr_wd_respects_group_scales():
    """Each group's lr and weight decay are the schedule's times its `lr_sc` / `wd_sc`; with every group's lr_sc 1
    (trainer.param_groups) an ignored lr_sc passed the suite."""
    a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a], "wd_sc": 1.0}, {"params": [b], "wd_sc": 0.0, "lr_sc": 0.5}], lr=1.0)
    set_lr_wd(opt, 3e-4, 0.05)
    assert [g["lr"] for g in opt.param_groups] == [3e-4, 1.5e-4]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_the_schedule_object_passes_each_setting_to_its_place():
    """`Schedule.at` against the functions it combines, with wp0 != wpe and twd != twde: it swapped wp0 with wpe (a
    warm-up from wpe ending at wp0) or twd with twde (VAR's default has them equal) and passed the suite."""
    sched = Schedule(tlr=2e-4, max_it=101, wp_it=10, sche="lin0", wp0=0.005, wpe=0.1, twd=0.05, twde=0.08)
    first, peak, last = sched.at(0), sched.at(10), sched.at(100)
    assert (first.lr, first.wd) == (2e-4 * 0.005, pytest.approx(0.05, rel=1e-12)) and peak.lr == 2e-4
    assert (last.lr, last.wd) == (pytest.approx(2e-4 * 0.1, rel=1e-12), pytest.approx(0.08, rel=1e-12))
    for it in (0, 5, 10, 37, 100):
        point = sched.at(it)
        assert point.lr == 2e-4 * lr_factor("lin0", it, 10, 101, 0.005, 0.1) and point.wd == wd_at(it, 101, 0.05, 0.08)


def var_prog_reference(max_it, wp_it, pg, pg0, K, pgwp_it):
    """VAR's stateful progressive-training bookkeeping (train.py + trainer.py), replayed over all iterations."""
    out, prog_it, last_si, first = [], 0, -1, True
    for g in range(max_it):
        si = prog_si_at(g, wp_it, max_it, pg, pg0, K)
        if last_si != si:
            if last_si != -1:
                first = False
            last_si, prog_it = si, 0
        prog_it += 1
        wp = 1.0 if first else max(min(prog_it / pgwp_it, 1), 0.01)
        out.append((-1, 1.0) if si == K - 1 else (si, wp))
    return out


def test_progressive_state_matches_vars_counters():
    max_it, wp_it, K, pgwp_it = 400, 40, 10, 13.3
    ref = var_prog_reference(max_it, wp_it, 0.6, 4, K, pgwp_it)
    got = [prog_state(g, wp_it, max_it, 0.6, 4, K, pgwp_it) for g in range(max_it)]
    assert got == ref
    stages = [si for si, _ in got]
    assert stages[0] == 4 and stages[-1] == -1 and sorted(set(stages) - {-1}) == [4, 5, 6, 7, 8]
    assert any(0.01 <= wp < 1 for _, wp in got)  # a new stage's scale is ramped in
    assert prog_state(5, wp_it, max_it, 0.0, 4, K, pgwp_it) == (-1, 1.0)  # --pg 0: no progressive training


def test_a_new_stages_loss_weight_has_a_floor_of_001():
    """VAR's prog_wp = max(min(prog_it / pgwp_it, 1), 0.01): with a ramp longer than 100 iterations (the official
    --pgwp is 2/3 of an epoch) the first iterations of a stage weigh its scale 0.01, not 1/pgwp_it; the suite's
    ramps were all shorter, and a floor of 0 passed it."""
    max_it, wp_it, K = 400, 40, 10
    first = next(it for it in range(max_it) if prog_si_at(it, wp_it, max_it, 0.6, 4, K) == 5)
    assert prog_state(first, wp_it, max_it, 0.6, 4, K, 400.0) == (5, 0.01)
    assert prog_state(first + 7, wp_it, max_it, 0.6, 4, K, 400.0) == (5, 0.02)


OFFICIAL = "--depth=16 --bs=768 --ep=200 --fp16=1 --alng=1e-3 --wpe=0.1 --data_path=/path/to/imagenet".split()


def test_progressive_stage_rounds_as_var():
    """VAR: prog_si = pg0 + round(progress * (K - 1 - pg0)); truncating (int) enters each stage half a stage late.
    Here progress = (it - 40) / 200 over 5 stages: 0.475 stages at it 59, 0.525 at 61, 1.525 at 101, 4.975 at 239
    (ties at it 60 and 100 left out: Python's round takes them to the even stage, in VAR too)."""
    def stage(it):
        return prog_si_at(it, 40, 400, 0.6, 4, 10)

    assert [stage(it) for it in (40, 41, 59, 61, 70, 99, 101, 239, 240)] == [4, 4, 4, 5, 5, 5, 6, 9, 9]


def test_official_command_parses_and_derives_vars_values():
    args = finalize_args(parse_args(OFFICIAL), world_size=8)
    assert (args.depth, args.bs, args.ep, args.fp16, args.alng, args.wpe) == (16, 768, 200, 1, 1e-3, 0.1)
    assert args.batch_size == 96 and args.glb_batch_size == 768
    assert args.tlr == pytest.approx(1e-4 * 768 / 256)
    assert args.wp == 4 and args.twde == 0.05 and args.pgwp == pytest.approx(200 / 300)
    assert args.patch_nums == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) and args.sche == "lin0"


def test_the_runs_schedule_takes_its_warm_ups_in_epochs_of_iterations():
    """train.build_schedule: --wp and --pgwp are epochs, the Schedule's wp_it and pgwp_it iterations (x the
    iterations per epoch), max_it = --ep x them. Passing --wp through as iterations (VAR's 4-epoch warm-up over 4
    iterations) passed the suite, whose runs have 2 epochs: wp = 0.04 epochs rounds to no warm-up either way."""
    import train

    args = finalize_args(parse_args([*OFFICIAL, "--pg=0.5"]), world_size=8)
    sched = train.build_schedule(args, iters_per_epoch=1668)
    assert (sched.max_it, sched.wp_it) == (200 * 1668, 4 * 1668)
    assert sched.pgwp_it == pytest.approx(200 / 300 * 1668, rel=1e-12)
    assert (sched.tlr, sched.wp0, sched.wpe, sched.twd, sched.twde) == (args.tlr, 0.005, 0.1, 0.05, 0.05)
    assert sched.at(2 * 1668).lr == pytest.approx(args.tlr * (0.005 + 0.995 / 2), rel=1e-12)  # mid-warm-up


def test_accumulation_and_progressive_derivations():
    args = finalize_args(parse_args(["--bs=1024", "--ac=4", "--pg=0.5", "--pn=512", "--twde=0.08",
                                         "--dataset=mnist"]), world_size=8)
    assert args.batch_size == 32 and args.glb_batch_size == 256 and args.bs_effective == 1024
    assert args.tlr == pytest.approx(4 * 1e-4 * 256 / 256)  # VAR: ac * tblr * glb_batch / 256
    assert args.sche == "lin0.5" and args.twde == 0.08 and args.patch_nums[-1] == 32


def test_a_batch_the_ranks_do_not_divide_is_rounded_as_vars_and_the_lr_follows_the_batch_trained():
    """VAR: batch_size = round(bs / ac / world_size) per rank, and the peak lr from the global batch that is trained
    (ac * tblr * glb_batch_size / 256), not from --bs. 768 over 5 ranks is 153.6: 154 per rank, 770 a step. A
    mutation review: flooring (153) or the lr from --bs passed the suite, whose batches all divide."""
    args = finalize_args(parse_args(["--bs=768", "--dataset=mnist"]), world_size=5)
    assert (args.batch_size, args.glb_batch_size, args.bs_effective) == (154, 770, 770)
    assert args.tlr == pytest.approx(1e-4 * 770 / 256, rel=1e-12)
    args = finalize_args(parse_args(["--bs=1000", "--ac=3", "--dataset=mnist"]), world_size=1)
    assert (args.batch_size, args.glb_batch_size, args.bs_effective) == (333, 333, 999)
    assert args.tlr == pytest.approx(3 * 1e-4 * 333 / 256, rel=1e-12)
    assert finalize_args(parse_args(["--bs=2", "--dataset=mnist"]), world_size=8).batch_size == 1  # never 0


def test_evaluation_sampling_defaults_are_the_papers_fid_settings_and_the_label_drop_vars():
    """--eval_every samples with the paper's FID settings (sample.py's --fid preset: cfg 1.5, top-k 900, top-p
    0.96) and VAR drops 10% of the labels for guidance. A mutation review: the picture settings (cfg 4, top-p 0.95)
    or no label drop as defaults passed the suite."""
    import sample

    d = parse_args([])
    fid = sample.PRESETS["fid"]
    assert (d.eval_cfg, d.eval_top_k, d.eval_top_p) == (fid["cfg"], fid["top_k"], fid["top_p"]) == (1.5, 900, 0.96)
    assert (d.cond_drop_rate, d.eval_n, d.drop_path_rate) == (0.1, 1000, -1.0)


def test_every_named_size_sets_the_papers_depth_width_architecture_and_schedule():
    """The registry in full as train.py reads it (models.presets.MVAR_models: the paper's Tables 1 and 5, VAR's
    sizes): a mutation review found M-VAR-d24-512's depth unchecked (its schedule alone was)."""
    def shape(name):
        a = parse_args([f"--model={name}"])
        return a.depth, a.embed_dim, a.arch, a.pn

    assert {name: shape(name) for name in MVAR_models} == {
        **{f"M-VAR-d{d}": (d, None, "mvar", None) for d in (12, 16, 20, 24, 30, 32)},
        **{f"VAR-d{d}": (d, None, "var", None) for d in (12, 16, 20, 24, 30)},
        "M-VAR-W": (16, 768, "mvar", None), "M-VAR-D": (12, 1024, "mvar", None),
        "M-VAR-d24-512": (24, None, "mvar", "1_2_3_4_6_9_13_18_24_32")}


@pytest.mark.parametrize("flag", ["--val_every=0", "--log_every=0", "--save_every=-1", "--sample_every=-2",
                                  "--save_every_min=-1", "--ep=0"])
def test_bad_periods_are_errors_at_start(flag):
    """Caught before training, not by a ZeroDivisionError at the end of the first epoch."""
    with pytest.raises(ValueError, match=flag.split("=")[0]):
        finalize_args(parse_args([flag]), world_size=1)


def test_boolean_flags_accept_vars_spellings():
    assert parse_args(["--hflip"]).hflip is True
    assert parse_args(["--hflip=1", "--saln=True", "--anorm=0"]).saln is True
    assert parse_args(["--anorm=false"]).anorm is False
    with pytest.raises(SystemExit):
        parse_args(["--hflip=maybe"])


def test_every_flag_has_help_and_spec_defaults():
    parser = build_parser()
    actions = [a for a in parser._actions if a.option_strings and a.dest not in ("help", "local_rank")]
    assert all(a.help for a in actions)
    d = vars(parse_args([]))
    spec = dict(depth=16, bs=768, ep=250, tblr=1e-4, twd=0.05, wp0=0.005, wpe=0.01, sche="lin0", tclip=2.0, ls=0.0,
                fp16=0, ac=1, alng=1e-5, aln=0.5, hd=0.02, ini=-1.0, saln=False, anorm=True, pg=0.0, pg0=4,
                hflip=False, mid_reso=1.125, tf32=True, dataset=None, data_path="")
    assert {k: d[k] for k in spec} == spec


def test_named_model_sets_the_size_flags_and_explicit_flags_win():
    """DiT's --model habit over the registry (models.presets.MVAR_models); the official flags keep working."""
    assert build_parser()._option_string_actions["--model"].choices == list(MVAR_models)
    w = parse_args(["--model=M-VAR-W"])
    assert (w.depth, w.embed_dim, w.arch) == (16, 768, "mvar")
    d = parse_args(["--model", "M-VAR-D"])
    assert (d.depth, d.embed_dim) == (12, 1024)
    v = parse_args(["--model=VAR-d16", "--depth=20"])
    assert (v.depth, v.arch) == (20, "var")
    assert parse_args(["--model=M-VAR-d24-512"]).pn == "1_2_3_4_6_9_13_18_24_32"
    assert (parse_args(["--depth=24"]).depth, parse_args([]).model) == (24, None)
    with pytest.raises(SystemExit):
        parse_args(["--model=M-VAR-d17"])


def test_dead_flags_are_gone():
    with pytest.raises(SystemExit):
        parse_args(["--opt=adamw"])  # was never read: AdamW is the only optimizer


def project_imports(folder: str) -> dict[Path, set[str]]:
    """Top-level project names each module under `folder` imports (absolute imports)."""
    project = ("models", "utils", "dist", "scripts", "trainer", "train", "sample", "tokenizer_trainer")
    found = {}
    for path in sorted((Path(__file__).resolve().parents[1] / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names |= {m.split(".")[0] for m in mods if m.split(".")[0] in project}
        found[path] = names
    return found


def test_layers_import_only_downwards():
    """models/ is the bottom layer and imports nothing else of this project (patch schedules, architectures and sizes
    come from its leaf models.presets), so it can be lifted into another codebase; utils/ imports models/ and dist/
    but never the trainers, the entry points or the scripts."""
    for path, names in project_imports("models").items():
        assert names <= {"models"}, (path, names)
    for path, names in project_imports("utils").items():
        assert names <= {"models", "utils", "dist"}, (path, names)


def test_a_fractional_warm_up_is_rounded_to_whole_iterations_as_vars():
    """VAR rounds wp_it (--wp epochs times the iterations per epoch need not be whole): 10.4 warm-up iterations
    are 10, so iteration 10 already runs at the peak lr (an unrounded 10.4 kept it in the warm-up)."""
    assert lr_factor("lin0", 10, 10.4, 1000, WP0, WPE) == 1.0
    assert lr_factor("lin0", 5, 10.4, 1000, WP0, WPE) == WP0 + (1 - WP0) * 5 / 10
