"""Zero-shot editing on digits (issue 18): in-painting, out-painting and class-conditional editing
with generators trained only for class-conditional generation, one grid and one table row per
paradigm.

For every checkpoint (``name=path``, a ``genmodels fit`` GeneratorModule checkpoint) and every
image of the digits val + test splits (360 images, never seen in training):

* in-paint the centre (a box of half the side, 16x16 of a 32 px image) as the image's own class;
* out-paint the bottom half as the image's own class;
* class-edit: regenerate the centre box, and separately the bottom half, as another digit
  (target = (y + 1 + i mod 9) mod 10, every class equally often).

Scores (the digits judge of ``genmodels/evaluation``: the shipped digits classifier): FID of the
in-painted / out-painted images against the train split (1,437 images; 64-d penultimate features),
and the classifier's accuracy on the class-edited images (the fraction that read as the requested
digit). Reference rows: the unedited images and the tokenizer's reconstructions of each run.
A raster-order model (causal AR) can only out-paint: its in-painting cells say so.

    python benchmarks/editing_digits.py maskgit=outputs/digits_maskgit/checkpoints/last.ckpt \\
        var=outputs/digits_var/checkpoints/last.ckpt --out benchmarks/results/editing_digits.md

Writes the table (markdown, with the command and times) and one grid PNG per paradigm beside it
(columns: input, centre mask, in-painted, bottom mask, out-painted, class-edited centre,
class-edited bottom; one row per example).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import genmodels
from genmodels.checkpoints.common import read_checkpoint
from genmodels.data.digits import digits_tensors
from genmodels.errors import GenmodelsError
from genmodels.evaluation.features import build_feature_extractor
from genmodels.evaluation.generation import extract
from genmodels.evaluation.metrics import feature_statistics, frechet_distance
from genmodels.utils.images import save_grid

def masks(S: int) -> dict[str, torch.Tensor]:
    """The centre box (half the side) and the bottom half of an S x S image, 1 = regenerate."""
    centre = torch.zeros(1, 1, S, S)
    centre[..., S // 4:3 * S // 4, S // 4:3 * S // 4] = 1
    bottom = torch.zeros(1, 1, S, S)
    bottom[..., S // 2:, :] = 1
    return {"centre": centre, "bottom": bottom}


def run_edit(pipe, x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, seed: int, batch: int,
             footprint: str = "any"):
    """uint8 edits of x (N, 3, S, S) uint8, in batches, one generator for the whole run; None if refused."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    try:
        for s in range(0, len(x), batch):
            out.append(pipe.edit(x[s:s + batch], mask, labels[s:s + batch], generator=gen, output="uint8",
                                 footprint=footprint))
    except GenmodelsError as e:
        return None, str(e)
    return torch.cat(out), None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="*", metavar="NAME=CKPT[@all]",
                    help="a checkpoint to edit with; @all: a token is regenerated only when all its pixels are masked")
    ap.add_argument("--out", default="benchmarks/results/editing_digits.md")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=60)
    ap.add_argument("--grid-rows", type=int, default=10)
    ap.add_argument("--num", type=int, default=360, help="edit the first NUM of the 360 val + test images")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--append", action="store_true", help="add the runs to the rows already in --out's .json "
                    "(without runs: rewrite the markdown from it)")
    ap.add_argument("--notes", help="a markdown file whose text is put under the table")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out_md = Path(a.out)
    judge = build_feature_extractor("digits-classifier").eval()
    rows, data = [], {}
    command = " ".join(["python benchmarks/editing_digits.py"] + (argv if argv is not None else sys.argv[1:]))
    commands = [command]
    old = out_md.with_suffix(".json")
    if a.append and old.is_file():
        saved = json.loads(old.read_text())
        if isinstance(saved, list):  # the first version wrote the rows alone
            saved = {"commands": [], "rows": saved}
        rows, commands = saved["rows"], saved["commands"] + (commands if a.runs else [])

    def feats(u8: torch.Tensor):
        return extract(judge, u8)

    def fid(u8: torch.Tensor, S: int) -> float:
        return frechet_distance(*feature_statistics(feats(u8).features), *data[S]["ref"])

    def acc(u8: torch.Tensor, want: torch.Tensor) -> float:
        return float((feats(u8).logits.argmax(-1) == want).float().mean())

    def digits(S: int) -> dict:
        """val + test images at side S, their labels, the class-edit targets, the train reference."""
        if S not in data:
            images, labels, splits = digits_tensors(S)
            images = images.expand(-1, 3, -1, -1).contiguous()  # grey -> RGB, as the data module gives them
            idx = torch.cat([splits["val"], splits["test"]])[:a.num]
            x, y = images[idx], labels[idx]
            data[S] = {"x": x, "y": y, "target": (y + 1 + torch.arange(len(y)) % 9) % 10,
                       "ref": feature_statistics(feats(images[splits["train"]]).features)}
            name = f"unedited val+test images ({S} px, N={len(x)})"
            if not any(r["name"] == name for r in rows):
                rows.append({"name": name, "fid_centre": fid(x, S), "fid_bottom": fid(x, S), "acc_own": acc(x, y)})
        return data[S]

    def write_report() -> None:
        """The markdown table + grids list and the JSON rows, rewritten after every run."""
        def f(v, fmt="{:.2f}"):
            if v is None:
                return "refused (raster order)"
            return "–" if v != v else fmt.format(v)  # nan: not applicable

        lines = [
            "# Zero-shot editing on digits (issue 18)", "",
            "Made by " + ", then ".join(f"`{c}`" for c in commands) + " (one thread each). "
            "Inputs: the first N (column N) of the 360 val + test images (never trained on). "
            "Masks: the centre box of half the side (in-painting) and the bottom half (out-painting); class editing "
            "regenerates the same regions as another digit (target = (y + 1 + i mod 9) mod 10). Judge: the shipped "
            "digits classifier (`genmodels/evaluation`): FID on its 64-d features against the 1,437 train images "
            "(small N: compare within this table only), accuracy = the fraction of images it reads as the requested "
            "digit. Knobs: each checkpoint's `sample_kwargs` (the genmodels sampling convention), seed " + str(a.seed)
            + ". Pixel models (FractalMAR) work on the 8 px digits: compare their rows with the 8 px reference row. "
            "FID recon: the tokenizer's reconstructions of the same images (an all-zero mask).", "",
            "| run | generator | steps | footprint | N | FID recon | FID in-paint centre ↓ | FID out-paint bottom ↓ "
            "| acc own class (in-paint) "
            "| class-edit acc centre ↑ | class-edit acc bottom ↑ | s/img (edit) | knobs |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(f"| {r['name']} | {r.get('model', '–')} | {r.get('steps', '–')} | "
                         f"{r.get('footprint', '–')} | "
                         f"{r.get('num', 360) if 'model' in r else r['name'].split('N=')[-1].rstrip(')')} | "
                         f"{f(r.get('fid_recon', float('nan')))} | "
                         f"{f(r['fid_centre'])} | {f(r['fid_bottom'])} | {f(r['acc_own'], '{:.3f}')} | "
                         f"{f(r.get('acc_edit_centre', float('nan')), '{:.3f}')} | "
                         f"{f(r.get('acc_edit_bottom', float('nan')), '{:.3f}')} | "
                         f"{f(r.get('s_per_img', float('nan')), '{:.4f}')} | {r.get('knobs', '–')} |")
        lines += ["", "Grids (columns: input, centre mask, in-painted, bottom mask, out-painted, class-edited centre, "
                  "class-edited bottom; rows: evenly spaced inputs; a grey cell = refused):", ""]
        for r in rows:
            if "grid" not in r:
                continue
            lines.append(f"- `{r['name']}`: ![{r['name']}]({r['grid']}) (class-edit targets, top to bottom: "
                         f"{r['grid_targets']}; total {r['total_s']:.0f} s)")
        if a.notes:
            lines += ["", Path(a.notes).read_text().strip()]
        out_md.parent.mkdir(parents=True, exist_ok=True)
        out_md.write_text("\n".join(lines) + "\n")
        out_md.with_suffix(".json").write_text(json.dumps({"commands": commands, "rows": rows}, indent=1,
                                                          default=str) + "\n")

    for spec in a.runs:
        name, _, ckpt = spec.partition("=")
        ckpt, _, footprint = ckpt.partition("@")  # NAME=CKPT@all: the "all" footprint rule
        footprint = footprint or "any"
        pipe = genmodels.load(ckpt)
        S = int(getattr(pipe.tokenizer, "image_size", None) or pipe.tokenizer.spec.image_size)
        d = digits(S)
        x, y, target, m = d["x"], d["y"], d["target"], masks(S)
        grid_rows = torch.arange(a.grid_rows) * (len(x) // a.grid_rows)
        t0 = time.perf_counter()
        rec = torch.cat([pipe.edit(x[s:s + a.batch], torch.zeros(1, 1, S, S), y[s:s + a.batch], output="uint8")
                         for s in range(0, len(x), a.batch)])
        steps = read_checkpoint(Path(ckpt)).get("global_step")
        row = {"name": name, "model": type(pipe.generator).__name__, "ckpt": ckpt, "knobs": pipe.sample_kwargs,
               "steps": steps, "footprint": footprint, "num": len(x),
               "size": S, "fid_recon": fid(rec, S)}
        edits, n_img, t_edit = {}, 0, 0.0
        for key, mask, lab in (("inpaint", m["centre"], y), ("outpaint", m["bottom"], y),
                               ("edit_centre", m["centre"], target), ("edit_bottom", m["bottom"], target)):
            t = time.perf_counter()
            out, why = run_edit(pipe, x, mask, lab, a.seed, a.batch, footprint)
            if out is not None:
                t_edit += time.perf_counter() - t
                n_img += len(out)
            edits[key] = out
            if why:
                row[f"refused_{key}"] = why
        row["fid_centre"] = fid(edits["inpaint"], S) if edits["inpaint"] is not None else None
        row["fid_bottom"] = fid(edits["outpaint"], S) if edits["outpaint"] is not None else None
        row["acc_own"] = acc(edits["inpaint"], y) if edits["inpaint"] is not None else None
        row["acc_edit_centre"] = acc(edits["edit_centre"], target) if edits["edit_centre"] is not None else None
        row["acc_edit_bottom"] = acc(edits["edit_bottom"], target) if edits["edit_bottom"] is not None else None
        row["s_per_img"] = t_edit / max(n_img, 1)
        row["total_s"] = time.perf_counter() - t0
        rows.append(row)
        # the grid: input | centre mask | in-painted | bottom mask | out-painted | edited centre | edited bottom
        blank = torch.full((len(grid_rows), 3, S, S), 128, dtype=torch.uint8)
        xi = x[grid_rows]

        def shown(mask):  # the input with the region to regenerate greyed out
            return torch.where(mask.bool().expand_as(xi), torch.full_like(xi, 160), xi)

        cols = [xi, shown(m["centre"]), edits["inpaint"][grid_rows] if edits["inpaint"] is not None else blank,
                shown(m["bottom"]), edits["outpaint"][grid_rows],
                edits["edit_centre"][grid_rows] if edits["edit_centre"] is not None else blank,
                edits["edit_bottom"][grid_rows]]
        grid = torch.stack(cols, dim=1).flatten(0, 1).float() / 127.5 - 1
        png = out_md.with_name(f"editing_digits_{name}.png")
        save_grid(grid, png, nrow=len(cols), scale=max(2, 64 // S))
        row["grid"] = png.name
        row["grid_targets"] = target[grid_rows].tolist()
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("refused")}), flush=True)
        write_report()

    if not a.runs:
        write_report()
    print(f"-> {out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
