"""Lab tool (not part of genmodels): seed a compare preset's output folder with finished trainings
from other compare output folders whose resolved configs are identical up to (a) the progress-line
name and (b) the curve-checkpoint callback (neither changes the weights), so an ablation on a busy
machine scores the quick preset's trainings instead of repeating them. Copies last.ckpt, train.json
(+ "copied_from"), attempts.json, fit.log and the cached scores / grids / FLOPs / NLL of the same
training (their keys hold the training key, so a copy is what the run would compute). Prints each match.

    PYTHONPATH=$PWD python benchmarks/results/ablations/seed_from.py configs/ablations/X.yaml OTHER_OUTPUT_DIR...
"""
import copy
import json
import shutil
import sys
from pathlib import Path

from genmodels.compare import Compare, Preset, _yaml

preset, srcs = sys.argv[1], [Path(a) for a in sys.argv[2:]]
c = Compare(Preset(preset))
c.plan()

def norm(d, tokmap):
    d = copy.deepcopy(d)
    cbs = d["trainer"].get("callbacks") or []
    d["trainer"]["callbacks"] = [cb for cb in cbs if not cb["class_path"].endswith("CompareProgress")
                                 and "step_" not in str(cb.get("init_args", {}).get("filename"))]
    ia = d["model"]["init_args"]
    if ia.get("tokenizer_ckpt"):
        ia["tokenizer_ckpt"] = tokmap.get(ia["tokenizer_ckpt"], ia["tokenizer_ckpt"])
    return d

theirs = {}
for kd in [k for src in srcs for k in src.glob("runs/*/key.yaml")]:
    if (kd.parent / "train.json").is_file():
        theirs[kd.parent] = _yaml(kd.read_text())
tokmap = {}   # placeholder of a tokenizer (either side) -> canonical "TOK:<their key>"
ts = sorted(c.trainings.values(), key=lambda t: t.kind != "tokenizer")
for t in ts:
    mine = norm(t.config, tokmap)
    hit = [d for d, cfg in theirs.items() if norm(cfg, tokmap) == mine]
    if not hit:
        print(f"no match: {t.kind} {t.label} {t.key}")
        continue
    hit = sorted(hit, key=lambda h: (not (h / "checkpoints" / "last.ckpt").is_file(), str(h)))
    d = hit[0]
    their_key = d.name.rsplit("-", 1)[1]
    if t.kind == "tokenizer":
        tokmap[f"__COMPARE_TOKENIZER_{t.key}__"] = f"TOK:{their_key}"
        tokmap[f"__COMPARE_TOKENIZER_{their_key}__"] = f"TOK:{their_key}"
    # cached scores / grids / FLOPs / NLL of the same training (score keys hold the training key, step,
    # judge settings and sampling knobs, so a copy is the score this run would compute)
    (t.dir / "scores").mkdir(parents=True, exist_ok=True)
    for h in hit:
        for f in list(h.glob("scores/*.json")) + list(h.glob("grid-*.pt")) + [h / "flops.json", h / "nll.json", h / "test_loss.json"]:
            dst = t.dir / f.relative_to(h)
            if f.is_file() and not dst.exists():
                shutil.copy(f, dst)
                print(f"  cached: {dst.relative_to(t.dir)} <- {h.name}")
    if t.done():
        print(f"already done: {t.label} {t.key}")
        continue
    (t.dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy(d / "checkpoints" / "last.ckpt", t.dir / "checkpoints" / "last.ckpt")
    for f in ("attempts.json", "fit.log"):
        if (d / f).is_file():
            shutil.copy(d / f, t.dir / f)
    done = json.loads((d / "train.json").read_text())
    done.update(key=t.key, label=t.label, copied_from=done.get("copied_from", str(d)))
    (t.dir / "train.json").write_text(json.dumps(done, indent=1))
    print(f"seeded: {t.kind} {t.label} {t.key} <- {d}")
