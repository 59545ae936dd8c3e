"""`genmodels compare`: run keys, mean +- std, the matched-budget check, and one tiny preset end to
end (table columns, grid and plots, a rerun that trains nothing, an interrupted run that resumes
from last.ckpt, an added run that alone is trained); every shipped preset and ablation passes the
budget check."""
from __future__ import annotations

import copy
import csv
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from genmodels.compare import (COLUMNS, HEADERS, Compare, Preset, Resolver, compare, loss_params_fit,
                               mark_within_spread, mean_std, missing_requirement, nest)
from genmodels.errors import GenmodelsError

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "compare" / "tiny.yaml"


@pytest.fixture(scope="module")
def resolver() -> Resolver:
    return Resolver()


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch, tmp_path_factory):
    monkeypatch.chdir(REPO)  # presets name config files relative to the repository
    monkeypatch.setenv("GENMODELS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _preset(tmp: Path, name: str = "p.yaml", runs: dict | None = None, extra_runs: list | None = None, **top) -> Path:
    raw = yaml.safe_load(TINY.read_text())
    raw["launcher"] = "inprocess"
    raw.update(top)
    for r in raw["runs"]:
        for k, v in (runs or {}).get(r["name"], {}).items():
            r.setdefault("overrides", {})[k] = v
    raw["runs"] += extra_runs or []
    path = tmp / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ---------------------------------------------------------------------------- units
def test_mean_std_and_within_spread_marks():
    assert mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert mean_std([4.0]) == {"mean": 4.0, "std": None, "n": 1}
    assert mean_std([None]) is None
    recs = [{"name": "a", "fid": mean_std([10.0, 12.0])},      # best: 11 +- 1.41
            {"name": "b", "fid": mean_std([11.5, 13.5])},      # 12.5 +- 1.41: |1.5| < 2.0 -> within
            {"name": "c", "fid": mean_std([20.0, 21.0])},      # far
            {"name": "d", "fid": mean_std([30.0])}]            # one seed: no spread, never marked
    mark_within_spread(recs, ("fid",))
    assert [r["within_spread"] for r in recs] == [[], ["fid"], [], []]
    fit = loss_params_fit([{"params_generator": n, "test_loss": mean_std([3.0 * n ** -0.25])} for n in (1e5, 1e6, 1e7)])
    assert fit["b"] == pytest.approx(-0.25) and fit["a"] == pytest.approx(3.0)
    assert nest({"a.b": 1, "a.c.d": [2], "e": {"f.g": 3}}) == {"a": {"b": 1, "c": {"d": [2]}}, "e": {"f": {"g": 3}}}
    assert missing_requirement(["genmodels.generators.maskgit.MaskGIT"]) is None
    assert missing_requirement(["genmodels.generators.maskgit.MASK_SCHEDULES has cosine"]) is None
    assert missing_requirement(["genmodels.generators.maskgit.MASK_SCHEDULES has cubic_x"]) is not None
    assert missing_requirement(["genmodels.tokenizers.no_such_module.Thing"]) == "genmodels.tokenizers.no_such_module.Thing"


def test_keys_follow_the_resolved_training_config_only(tmp_path, resolver):
    def keys(path, out):
        c = Compare(Preset(path, output_dir=str(out)), resolver)
        c.plan()
        return {r.spec["name"]: r.training.key for r in c.rows}, c.tok_of["vq"].key

    base = _preset(tmp_path)
    k1, tok1 = keys(base, tmp_path / "a")
    k2, tok2 = keys(base, tmp_path / "elsewhere")          # the output folder is not part of a key
    assert k1 == k2 and tok1 == tok2 and len(set(k1.values())) == 3  # maskgit, causal_ar, not-built unbuilt_maskgit ("")
    raw = yaml.safe_load(base.read_text())
    raw["runs"][0]["sampling"] = {"num_steps": 2, "cfg": 3.0}            # sampling: same training
    raw["runs"][1].setdefault("overrides", {})["model.init_args.lr"] = 5e-4  # a training knob: a new key
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(raw))
    k3, _ = keys(tmp_path / "q.yaml", tmp_path / "a")
    assert k3["maskgit"] == k1["maskgit"] and k3["causal_ar"] != k1["causal_ar"]
    # a sampling sweep: rows with other names and knobs share the training (the name is only in the
    # progress line, filled in when the config is written); the tokenizer's key name does not count
    swept = copy.deepcopy(raw)
    sweep = copy.deepcopy(swept["runs"][0])
    sweep.update(name="maskgit, 2 steps", sampling={"num_steps": 2, "cfg": 1.0})
    swept["runs"].append(sweep)
    swept["tokenizers"]["vq2d"] = swept["tokenizers"].pop("vq")
    for r in swept["runs"]:
        r["tokenizer"] = "vq2d" if r["tokenizer"] == "vq" else r["tokenizer"]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(swept))
    c = Compare(Preset(tmp_path / "s.yaml", output_dir=str(tmp_path / "a")), resolver)
    c.plan()
    ks = {r.spec["name"]: r.training for r in c.rows}
    assert ks["maskgit, 2 steps"] is ks["maskgit"] and ks["maskgit"].key == k1["maskgit"]
    assert c.tok_of["vq2d"].key == tok1
    written = yaml.safe_load(c._materialise(ks["maskgit"]).read_text())
    progress = [cb["init_args"] for cb in written["trainer"]["callbacks"] if cb["class_path"].endswith("CompareProgress")]
    assert progress[0]["name"] == "maskgit" and progress[0]["total_steps"] == 4
    raw["tokenizers"]["vq"]["overrides"]["trainer.max_steps"] = 5          # another tokenizer: new generator keys
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    k4, tok4 = keys(tmp_path / "r.yaml", tmp_path / "a")
    assert tok4 != tok1 and k4["maskgit"] != k1["maskgit"]
    c = Compare(Preset(base, seeds=2, output_dir=str(tmp_path / "a")), resolver)
    c.plan()
    assert len({r.training.key for r in c.rows if r.spec["name"] == "maskgit"}) == 2  # one training per seed


def test_budget_mismatch_is_refused_with_the_numbers(tmp_path, resolver, capsys):
    wide = _preset(tmp_path, "wide.yaml", runs={"maskgit": {"model.init_args.generator.init_args.hidden_size": 64}})
    with pytest.raises(GenmodelsError) as e:
        compare(wide, check_only=True, resolver=resolver)
    msg = str(e.value)
    assert "'maskgit' has 31,456 generator parameters" in msg and "11,600" in msg and "9,860..13,340" in msg and "causal_ar" not in msg
    assert "\n" not in msg
    longer = _preset(tmp_path, "long.yaml", runs={"causal_ar": {"trainer.max_steps": 8,
                                                                "model.init_args.lr_schedule": "constant"}})
    with pytest.raises(GenmodelsError) as e:
        compare(longer, check_only=True, resolver=resolver)
    assert "sees 128 images (8 steps x batch 16 x 1 processes), budget 64 (4 x 16)" in str(e.value)
    assert "lr_schedule 'constant', budget 'cosine'" in str(e.value)
    # through the CLI: one line, no traceback, exit code 2
    from genmodels.cli import main
    with pytest.raises(SystemExit) as ex:
        main(["compare", "-c", str(wide), "--check"])
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("genmodels: error: compare:") and "Traceback" not in err[0]


def test_shipped_presets_and_ablations_pass_the_budget_check(resolver, tmp_path):
    files = [f for f in sorted((REPO / "configs" / "compare").glob("*.yaml")) if f.name != "tiny.yaml"]  # tiny: e2e
    files += sorted((REPO / "configs" / "ablations").glob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        out = compare(f, check_only=True, resolver=resolver, output_dir=str(tmp_path / f.stem))
        c = out["compare"]
        assert out["budget"], f"{f.name}: no run was checked"
        paper = c.p.paper
        if f.parent.name == "ablations":
            assert paper and paper.get("source") and paper.get("rows"), f"{f.name}: needs a paper: block"
            assert set(paper["rows"]) <= {r["name"] for r in c.p.runs}, f"{f.name}: paper rows name unknown runs"


# ---------------------------------------------------------------------------- end to end
def test_tiny_compare_end_to_end_resume_and_incremental(tmp_path, resolver, monkeypatch, capsys):
    out_dir = tmp_path / "out"
    preset = _preset(tmp_path)
    import genmodels.compare as compare_module

    # the side-by-side grid shows the first judged samples of each class: nothing is sampled again
    monkeypatch.setattr(compare_module, "sample_grid", lambda *a, **k: pytest.fail("grid sampled anew"))
    res = compare(preset, output_dir=str(out_dir), resolver=resolver)
    monkeypatch.undo()
    assert res["failed"] == 0
    c = res["compare"]
    row = next(r for r in c.rows if r.spec["name"] == "causal_ar")
    npz = c.results[("causal_ar", row.seed)]["row"]["samples_npz"]
    from genmodels.evaluation.adm_export import read_adm_npz_all
    images, _, labels = read_adm_npz_all(npz)
    first_of_3 = images[list(labels).index(3)]
    assert (c.grid_images(row)[3] == torch.from_numpy(first_of_3).permute(2, 0, 1).float() / 127.5 - 1).all()
    recs = {r["name"]: r for r in res["rows"]}
    assert recs["maskgit"]["status"] == "ok" and recs["causal_ar"]["status"] == "ok"
    assert recs["unbuilt_maskgit"]["status"].startswith("not built")
    for name in ("maskgit", "causal_ar"):
        r = recs[name]
        assert r["images_seen"] == 64 and r["steps"] == 4 and r["train_flops"] > 0 and r["fid"]["mean"] > 0
        assert r["tokenizer_rfid"] is not None and r["sec_per_image"]["mean"] > 0
        assert len(r["curves"][0]) == 2  # checkpoints at steps 2 and 4 scored
    assert recs["causal_ar"]["bits_per_dim"]["mean"] > 0 and recs["maskgit"]["bits_per_dim"] is None
    md = (out_dir / "table.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| run |"))
    assert [h.strip() for h in header.strip("|").split("|")] == HEADERS
    assert "| unbuilt_maskgit |" in md and "not built" in md
    with open(out_dir / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["maskgit", "causal_ar", "unbuilt_maskgit"]
    assert set(COLUMNS) <= set(rows[0]) and float(rows[1]["fid"]) > 0
    for png in ("grid.png", "fid_vs_speed.png", "fid_vs_compute.png"):
        assert (out_dir / png).stat().st_size > 1000

    # a rerun trains and scores nothing
    launched = []
    real_launch = Compare._launch
    monkeypatch.setattr(Compare, "_launch", lambda self, args, log: launched.append(args) or real_launch(self, args, log))
    again = compare(preset, output_dir=str(out_dir), resolver=resolver)
    assert launched == [] and again["rows"][0]["fid"] == res["rows"][0]["fid"]

    # an interrupted run (last.ckpt at step 2, no done marker) resumes; an added run alone is trained
    mg = next(out_dir.glob("runs/maskgit-*"))
    shutil.copy(mg / "checkpoints" / "step_0000002.ckpt", mg / "checkpoints" / "last.ckpt")
    (mg / "train.json").unlink()
    for f in (mg / "scores").glob("*.json"):
        f.unlink()
    added = _preset(tmp_path, "added.yaml", extra_runs=[{
        "name": "maskgit_linear", "tokenizer": "vq", "configs": ["configs/generators/maskgit_digits.yaml"],
        "overrides": {"model.init_args.warmup_steps": 1, "model.init_args.generator.init_args": {
            "vocab_size": 32, "token_shape": [4, 4], "hidden_size": 32, "depth": 1, "num_heads": 2,
            "intermediate_size": 64, "mask_schedule": "linear"}},
        "sampling": {"num_steps": 4, "cfg": 1.0}}])
    capsys.readouterr()
    third = compare(added, output_dir=str(out_dir), resolver=resolver)
    fits = [a for a in launched if a[0] == "fit"]
    assert len(fits) == 2
    assert sum("--ckpt_path" in a for a in fits) == 1 and any(str(mg) in a[2] for a in fits if "--ckpt_path" in a)
    assert "maskgit: resumed at step 2/4" in capsys.readouterr().out
    import json
    attempts = json.loads((mg / "attempts.json").read_text())
    assert [a["resumed"] for a in attempts] == [False, True]
    assert json.loads((mg / "train.json").read_text())["steps"] == 4
    assert {r["name"] for r in third["rows"] if r["status"] == "ok"} == {"maskgit", "causal_ar", "maskgit_linear"}


def test_pixel_space_row_trains_no_tokenizer_and_uses_its_own_data(tmp_path, resolver):
    """A tokenizer with ``train: false`` (FractalGen's pixels) trains nothing; its run composes its
    own data config (8-px digits), gets no tokenizer_ckpt, and reads "pixels (identity)", rFID 0."""
    raw = yaml.safe_load(TINY.read_text())
    raw.update(launcher="inprocess", overrides={}, grid={"classes": [0, 1], "per_class": 1, "seed": 0})
    raw["budget"]["curve_every"] = 0
    raw["judge"].update(num_samples=10, curve_num_samples=10)
    raw["tokenizers"] = {"pixels": {"requires": ["genmodels.tokenizers.pixels.Pixels"], "train": False}}
    raw["runs"] = [{"name": "fractalar", "tokenizer": "pixels", "data": ["configs/data/digits_pixels8.yaml"],
                    "configs": ["configs/generators/fractalar_digits.yaml"], "target_params": 36112,
                    "overrides": {"model.init_args.warmup_steps": 1, "model.init_args.generator.init_args": {
                        "embed_dim_list": [16, 16, 8], "num_blocks_list": [1, 1, 1], "num_heads_list": [2, 2, 1]}},
                    "sampling": {"cfg": 1.0}}]
    path = tmp_path / "pixels.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    out_dir = tmp_path / "out"
    res = compare(path, output_dir=str(out_dir), resolver=resolver)
    t = res["compare"].rows[0].training
    assert t.tokenizer is None and t.config["model"]["init_args"].get("tokenizer_ckpt") is None
    assert t.config["data"]["init_args"]["image_size"] == 8 and t.config["data"]["init_args"]["batch_size"] == 16
    rec = res["rows"][0]
    assert res["failed"] == 0 and rec["status"] == "ok" and rec["fid"]["mean"] > 0
    assert rec["tokenizer"] == "pixels (identity)" and rec["tokenizer_rfid"] == 0.0
    assert [p.name for p in (out_dir / "runs").iterdir()] == [t.dir.name]       # no tokenizer training
    assert (out_dir / "grid.png").stat().st_size > 1000
    # a train: false tokenizer whose run builds no tokenizer itself is refused in one line
    raw["runs"][0]["configs"] = ["configs/generators/maskgit_digits.yaml"]
    raw["runs"][0]["overrides"] = {}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(GenmodelsError, match="must set model.init_args.tokenizer"):
        compare(path, check_only=True, resolver=resolver, output_dir=str(out_dir))


def test_sigterm_takes_the_launched_children_down(tmp_path, resolver):
    """A compare killed with SIGTERM leaves no orphaned fit writing into a run folder that the next
    compare resumes; nothing new is launched after the signal."""
    import subprocess
    import sys

    import genmodels.compare as compare_module

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    compare_module._children.add(child)
    try:
        with pytest.raises(SystemExit) as e:
            compare_module.stop_children(15)
        assert e.value.code == 143 and child.wait(timeout=10) != 0
        c = Compare(Preset(_preset(tmp_path, launcher="subprocess")), resolver)
        assert c._launch(["fit", "--help"], tmp_path / "x.log") == 143 and not (tmp_path / "x.log").exists()
    finally:
        compare_module._children.discard(child)
        compare_module._stopping.clear()
        child.kill()


def test_chained_tokenizers_train_in_order_and_key_on_their_inputs(tmp_path, resolver):
    """A tokenizer's ``checkpoints:`` field gets another tokenizer's last.ckpt (TiTok's two stages):
    dependencies are planned first, their keys are part of the user's key, the written config
    holds the real path; unknown names and cycles are refused; a not-built input propagates."""
    raw = yaml.safe_load(TINY.read_text())
    raw["launcher"] = "inprocess"
    stage = {"configs": ["configs/tokenizers/titok_digits_two_stage.yaml", "configs/experiments/digits_titok_stage1.yaml"],
             "checkpoints": {"model.init_args.tokenizer.init_args.teacher_ckpt": "vq"}}
    raw["tokenizers"] = {"stage1": stage, **raw["tokenizers"]}   # listed before its input
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    p = Preset(tmp_path / "c.yaml", output_dir=str(tmp_path / "out"))
    assert p.tokenizer_order().index("vq") < p.tokenizer_order().index("stage1")
    c = Compare(p, resolver)
    c.plan()
    s1, vq = c.tok_of["stage1"], c.tok_of["vq"]
    assert s1.needs == {"model.init_args.tokenizer.init_args.teacher_ckpt": vq}
    written = yaml.safe_load(c._materialise(s1).read_text())
    assert written["model"]["init_args"]["tokenizer"]["init_args"]["teacher_ckpt"] == str(vq.last_ckpt)
    raw["tokenizers"]["vq"]["overrides"]["trainer.max_steps"] = 5     # the input changes: so does the user's key
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    c2 = Compare(Preset(tmp_path / "d.yaml", output_dir=str(tmp_path / "out")), resolver)
    c2.plan()
    assert c2.tok_of["stage1"].key != s1.key
    bad = copy.deepcopy(raw)
    bad["tokenizers"]["stage1"]["checkpoints"] = {"x": "nope"}
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(bad, sort_keys=False))
    with pytest.raises(GenmodelsError, match="checkpoints.x names 'nope'"):
        Preset(tmp_path / "e.yaml")
    bad["tokenizers"]["stage1"]["checkpoints"] = {"x": "vq"}
    bad["tokenizers"]["vq"]["checkpoints"] = {"y": "stage1"}
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(bad, sort_keys=False))
    with pytest.raises(GenmodelsError, match="cycle"):
        Preset(tmp_path / "f.yaml")
    unbuilt = copy.deepcopy(raw)
    unbuilt["tokenizers"]["stage1"]["checkpoints"] = {"model.init_args.tokenizer.init_args.teacher_ckpt": "unbuilt"}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(unbuilt, sort_keys=False))
    c3 = Compare(Preset(tmp_path / "g.yaml", output_dir=str(tmp_path / "out")), resolver)
    c3.plan()
    assert c3.tok_of["stage1"].status == "not built" and "tok-unbuilt" in c3.tok_of["stage1"].reason
