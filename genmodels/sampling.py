"""The sampling maths every generator shares: one meaning of every knob (DESIGN.md).

The convention (the ``Generator`` contract):

* ``cfg`` is the guidance weight w in ``uncond + w * (cond - uncond)``. ``cfg = 1`` is no
  guidance, and a generator then skips the unconditional pass.
* ``guidance_schedule`` says how w moves with the sampling progress p in [0, 1]
  (``guidance_weight``): ``constant`` (w), ``linear`` (1 + (w - 1) p: MAR's ``linear``,
  MUSE/TiTok's ``linear``, VAR's per-scale ramp), ``power-cosine``
  (1 + (w - 1) (1 - cos(pi p^pow)) / 2, MDT/TiTok).
* ``top_k = 0`` and ``top_p = 1.0`` are off (``filter_logits_``).
* ``temperature`` divides the logits of a categorical draw (1 = the model's distribution);
  for a diffusion head it scales the noise (MAR's official meaning), documented there.

A paper whose knob means something else is mapped by one function here (``from_var_cfg`` /
``from_var``, ``from_titok_guidance``, ``from_fractal_temperature``, ``from_mar_temperature``);
paper configs state the paper's value beside ours (a ``paper_knobs`` comment / field).

Random draws come from an explicit ``torch.Generator``. Two Gumbel forms exist because
the official codebases draw them differently and seed-exact parity needs the same draws:
``gumbel_noise`` (-log(-log u), 1d-tokenizer / MaskGIT) and ``gumbel_softmax``
(-log Exp(1), VAR's ``gumbel_softmax_with_rng``).
"""
from __future__ import annotations

import math

import torch

from genmodels.errors import GenmodelsError

GUIDANCE_SCHEDULES = ("constant", "linear", "power-cosine")


# ----------------------------------------------------------------------- guidance
def guidance_weight(cfg: float, schedule: str = "constant", progress: float = 1.0, power: float = 3.0) -> float:
    """w at sampling progress ``progress`` in [0, 1] for final weight ``cfg`` (see module doc)."""
    if schedule == "constant":
        return float(cfg)
    if schedule == "linear":
        return 1.0 + (cfg - 1.0) * progress
    if schedule == "power-cosine":
        return 1.0 + (cfg - 1.0) * (1.0 - math.cos(math.pi * progress ** power)) / 2.0
    raise GenmodelsError(f"guidance_schedule must be one of {GUIDANCE_SCHEDULES}, got {schedule!r}")


GUIDANCE_FORMS = ("uncond", "cond", "var")


def guide(cond: torch.Tensor, uncond: torch.Tensor, w: float | torch.Tensor, form: str = "uncond") -> torch.Tensor:
    """``uncond + w * (cond - uncond)``; w = 1 returns ``cond`` itself.

    ``form`` only chooses the float arithmetic of the same quantity, so that each paper's
    parity test is seed-exact: ``uncond`` ``uncond + w (cond - uncond)`` (MAR, MDT/TiTok
    power-cosine), ``cond`` ``cond + (w - 1)(cond - uncond)`` (MUSE/TiTok constant and
    linear), ``var`` ``w cond - (w - 1) uncond`` (VAR's ``(1 + t) cond - t uncond``).
    ``w`` may be a tensor broadcasting against ``cond`` (e.g. one weight per row).
    """
    if not torch.is_tensor(w) and w == 1.0:
        return cond
    if form == "uncond":
        return uncond + w * (cond - uncond)
    if form == "cond":
        return cond + (w - 1.0) * (cond - uncond)
    if form == "var":
        return w * cond - (w - 1.0) * uncond
    raise ValueError(f"guidance form must be one of {GUIDANCE_FORMS}, got {form!r}")


def check_schedule(schedule: str) -> str:
    """Return ``schedule`` if it is a known guidance schedule, else raise naming the knob."""
    if schedule not in GUIDANCE_SCHEDULES:
        raise GenmodelsError(f"guidance_schedule must be one of {GUIDANCE_SCHEDULES}, got {schedule!r}")
    return schedule


def with_null(labels: torch.Tensor, null_class: int) -> torch.Tensor:
    """(B,) labels -> (2B,) ``[labels | null]``: the batch layout of a guided forward pass."""
    return torch.cat([labels, torch.full_like(labels, null_class)])


# ----------------------------------------------------------------------- paper knobs
def from_var_cfg(var_cfg: float) -> dict:
    """VAR's official ``cfg`` c: at scale k of K, ``(1 + t) cond - t uncond`` with
    t = c k / (K - 1), i.e. w = 1 + c at the last scale, ramping linearly from 1.
    Returns our knobs ``{"cfg": 1 + c, "guidance_schedule": "linear"}``."""
    return {"cfg": 1.0 + var_cfg, "guidance_schedule": "linear"}


def from_var_top_p(var_top_p: float) -> float:
    """VAR's official ``top_p``: 0 means off (ours: 1.0); any other value means the same."""
    return 1.0 if var_top_p <= 0 else float(var_top_p)


def from_var(cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0, **rest) -> dict:
    """The keyword arguments of VAR's official ``autoregressive_infer_cfg`` (``cfg``,
    ``top_k``, ``top_p``, ``more_smooth``; ``B``, ``label_B``, ``g_seed`` are dropped) ->
    our ``sample`` knobs (``from_var_cfg`` + ``from_var_top_p``; top_k means the same)."""
    rest = {k: v for k, v in rest.items() if k not in ("B", "label_B", "g_seed")}
    return {**from_var_cfg(cfg), "top_k": int(top_k), "top_p": from_var_top_p(top_p), **rest}


def from_mar_temperature(temperature: float) -> float:
    """MAR's ``temperature`` scales the noise of each DiffLoss reverse step (MAR Sec. 3.3),
    ours does the same for a diffusion head (``DiffLoss.sample``): the identity, kept so
    that every paper knob has its one mapping function. For MAR's cross-entropy head
    (discrete tokens) temperature divides the logits, as everywhere else."""
    if temperature < 0:
        raise GenmodelsError(f"MAR temperature must be >= 0, got {temperature}")
    return float(temperature)


def from_titok_guidance(guidance_scale: float, guidance_decay: str = "constant") -> dict:
    """TiTok/MaskGIT ``guidance_scale`` g: ``cond + g (cond - uncond)`` for the constant and
    linear decays (w = 1 + g), ``uncond + g (cond - uncond)`` for power-cosine (w = g)."""
    schedule = {"constant": "constant", "linear": "linear", "power-cosine": "power-cosine"}[guidance_decay]
    w = guidance_scale if schedule == "power-cosine" else 1.0 + guidance_scale
    return {"cfg": w, "guidance_schedule": schedule}


def from_fractal_temperature(temperature: float) -> float:
    """FractalGen's PixelLoss temperature multiplies the logits; ours divides them."""
    if temperature <= 0:
        raise GenmodelsError(f"FractalGen temperature must be > 0, got {temperature}")
    return 1.0 / temperature


# ----------------------------------------------------------------------- filtering
def check_knobs(*, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, cfg: float = 1.0) -> None:
    """Raise a ``GenmodelsError`` (a ValueError) naming the knob if it is outside its range."""
    if not temperature > 0:
        raise GenmodelsError(f"temperature must be > 0, got {temperature}")
    if top_k < 0 or int(top_k) != top_k:
        raise GenmodelsError(f"top_k must be an integer >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise GenmodelsError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    if not math.isfinite(cfg):
        raise GenmodelsError(f"cfg must be finite, got {cfg}")


def filter_logits_(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and the nucleus to -inf, in place; returns ``logits``.

    logits (..., V). top-k keeps the logits >= the k-th largest (ties kept; 0 = off).
    top-p (Holtzman et al. 2020; 1 = off) is applied to the top-k survivors and keeps a token
    when the probability mass of the strictly more likely tokens is < p: computed as VAR's
    official ``sample_with_top_k_top_p_`` does (ascending sort, drop where the cumulative
    mass <= 1 - p), so its float rounding is the same; the most likely token always stays.
    With both on, the nucleus is found among the top-k survivors only (``_top_p_of_top_k_``:
    no sort of the whole vocabulary, the same filtered set bit for bit); rows it cannot
    decide take the full sort.
    """
    return filter_logits_with_candidates_(logits, top_k, top_p)[0]


def filter_logits_with_candidates_(logits: torch.Tensor, top_k: int = 0,
                                   top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``filter_logits_`` that also returns the top-k ids it found: ``(logits, candidates)``.

    ``candidates`` (N, m) int64, N = logits[..., 0].numel(), m >= top_k: per row, ids that
    include every logit left finite (the survivors), for ``sample_categorical(candidates=)``;
    None when top-k is off or a row's survivors are not all among them (ties at the k-th
    value past the ids found, rows the top-p had to sort).
    """
    V = logits.shape[-1]
    if 0 < top_k < V:
        flat = logits.view(-1, V)
        if top_p < 1.0:
            # the k + 1 largest: the (k+1)-th tells whether the k-th value is tied (more survivors)
            vals, idx = flat.topk(top_k + 1, dim=-1, largest=True, sorted=True)
            kth = vals[:, top_k - 1:top_k]
            if bool((vals[:, top_k] == kth[:, 0]).any()):
                # ties at the k-th value (common with bfloat16 logits): every logit >= it survives;
                # take the largest survivor count m of any row (+1 to see past it)
                m = int((flat >= kth).sum(-1).max())
                if m < V:
                    vals, idx = flat.topk(m + 1, dim=-1, largest=True, sorted=True)
            rest = ~_top_p_of_top_k_(flat, vals, idx, top_p, kth)
            if bool(rest.any()):
                sub = flat[rest]
                flat[rest] = _top_p_sorted_(sub.masked_fill_(sub < kth[rest], -torch.inf), top_p)
                return logits, None
            return logits, idx[:, :-1]
        vals, idx = flat.topk(top_k, dim=-1, largest=True, sorted=False)
        kth = vals.amin(dim=-1, keepdim=True)
        drop = flat < kth
        flat.masked_fill_(drop, -torch.inf)
        # a tie at a finite k-th value keeps more than k logits: then the k ids do not cover them
        covered = (drop.sum(-1) == V - top_k) | (kth[:, 0] == -torch.inf)
        return logits, idx if bool(covered.all()) else None
    if top_p < 1.0:
        _top_p_sorted_(logits, top_p)
    return logits, None


def _top_p_sorted_(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The official top-p in place (ascending sort, drop where the cumulative mass <= 1 - p)."""
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
    remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
    remove[..., -1:] = False
    return logits.masked_fill_(remove.scatter(-1, sorted_idx, remove), -torch.inf)


def _top_p_of_top_k_(logits: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, top_p: float,
                     kth: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p of ``filter_logits_`` for rows of ``logits`` (N, V) from their m + 1
    largest logits ``vals`` / ``idx`` (N, m + 1) (descending; m >= k; ``kth`` (N, 1) is the
    k-th largest, a logit >= it survives top-k): writes the filtered rows it can decide and
    returns which (N,) bool; the others stay untouched (the caller sorts them).

    The official ascending sort of a top-k-masked row is -inf entries followed by the
    survivors in ascending order; that row is built directly from the m largest, the
    non-survivors among them set to -inf (no sort of V entries), so its softmax and cumulative
    sum are the official ones bit for bit (the same values into the same ops). A row is left
    to the sort when a survivor lies past its m-th value, when its k-th or largest value is not
    finite, and when equal survivors are split by the top-p threshold (their order in a sort is
    arbitrary, so which one is dropped is the sort's).
    """
    V, m = logits.shape[-1], vals.shape[-1] - 1
    ok = (vals[:, m] < kth[:, 0]) & torch.isfinite(kth[:, 0]) & torch.isfinite(vals[:, 0])
    asc, asc_idx = vals[:, :m].masked_fill(vals[:, :m] < kth, -torch.inf).flip(-1), idx[:, :m].flip(-1)
    row = logits.new_full(logits.shape, -torch.inf)
    row[:, V - m:] = asc
    remove = row.softmax(dim=-1).cumsum_(dim=-1)[:, V - m:] <= (1 - top_p)
    remove[:, -1:] = False
    if m > 1:
        ok &= ~((asc[:, 1:] == asc[:, :-1]) & (remove[:, 1:] != remove[:, :-1])).any(-1)
    if bool(ok.all()):
        logits.fill_(-torch.inf).scatter_(-1, asc_idx, asc.masked_fill_(remove, -torch.inf))
    elif bool(ok.any()):
        logits[ok] = row.fill_(-torch.inf)[ok].scatter_(-1, asc_idx[ok], asc[ok].masked_fill_(remove[ok], -torch.inf))
    return ok


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Out-of-place ``filter_logits_``."""
    if top_k <= 0 and top_p >= 1.0:
        return logits
    return filter_logits_(logits.clone(), top_k, top_p)


# ----------------------------------------------------------------------- random draws
def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, eps: float = 1e-20) -> torch.Tensor:
    """Standard Gumbel noise -log(-log u), u ~ U[0, 1), both logs clamped at ``eps``
    (1d-tokenizer's ``add_gumbel_noise``)."""
    u = torch.rand(shape, generator=generator, device=device)
    return -torch.log((-torch.log(u.clamp(min=eps))).clamp(min=eps))


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Soft Gumbel-softmax ``softmax((logits + g) / tau)`` with g = -log Exp(1) drawn from
    ``generator`` (VAR's official ``gumbel_softmax_with_rng``)."""
    gumbels = -torch.empty_like(logits).exponential_(generator=generator).log()
    return ((logits + gumbels) / tau).softmax(dim=-1)


def sample_categorical(logits: torch.Tensor, generator: torch.Generator | None = None, *,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       method: str = "multinomial", candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one id per row of softmax(filter(logits / temperature)). logits (..., V) -> (...) int64.

    ``method``: ``multinomial`` (``torch.multinomial`` on the probabilities, as VAR, MAR and
    LlamaGen-style code draw; ``multinomial_one``) or ``gumbel`` (argmax of logits + Gumbel
    noise, as 1d-tokenizer). Both give the same distribution; they consume the generator
    differently. ``candidates`` (N, m): ids covering every finite logit of each row, from
    ``filter_logits_with_candidates_`` when the caller filtered the logits itself.
    """
    if temperature != 1.0:
        logits = (logits.float() / temperature).contiguous()
    elif top_k > 0 or top_p < 1.0:
        # filtered in place below; the caller's logits stay
        logits = logits.float().clone(memory_format=torch.contiguous_format)
    else:
        logits = logits.float()  # nothing to filter: no copy
    if top_k > 0 or top_p < 1.0:
        logits, candidates = filter_logits_with_candidates_(logits, top_k, top_p)
    if method == "gumbel":
        return (logits + gumbel_noise(tuple(logits.shape), generator, logits.device)).argmax(-1)
    if method != "multinomial":
        raise GenmodelsError(f"method must be 'multinomial' or 'gumbel', got {method!r}")
    V = logits.shape[-1]
    probs = logits.softmax(dim=-1).reshape(-1, V)
    return multinomial_one(probs, generator, candidates).view(logits.shape[:-1])


_MANTISSA = (1 << 53) - 1  # the 53 bits of a double in [0, 1) that torch's CPU uniform keeps
_EXACT_DRAW: dict[str, bool] = {}


def multinomial_one(probs: torch.Tensor, generator: torch.Generator | None = None,
                    candidates: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.multinomial(probs, 1, generator=generator)`` as (N,) int64, probs (N, V).

    torch draws one id per row as argmax_j p_j / q_j with q ~ Exp(1) over the whole row (the
    exponential race), and on the CPU each q_j is ``-log1p(-u_j)`` in double of one 64-bit
    random number u_j, drawn serially with a double ``log1p`` per entry: 4,096 of them per VAR
    token, ~6 % of VAR's sampling. With ``candidates`` (N, m) that cover every p_j > 0, the
    same 64-bit numbers come from ``random_`` (the same generator stream, ~4x cheaper) and q
    is computed only at the candidates, so the id and the generator's state afterwards are
    torch's own, bit for bit. Written here because torch has no such draw; it is used only
    where a probe at first use finds it equal to ``exponential_`` (float32 CPU), else torch's.
    The one difference: a u_j = 0 at a non-candidate (probability 2^-53 per entry) makes torch
    return that zero-probability id; here a candidate is drawn.
    """
    N, V = probs.shape
    if (candidates is None or 2 * candidates.shape[-1] > V or probs.device.type != "cpu"
            or probs.dtype != torch.float32 or not probs.is_contiguous() or not _exact_draw_ok()):
        # (with more than V / 2 candidates the double log1p at them costs what torch's draw does)
        return torch.multinomial(probs, 1, replacement=True, generator=generator).view(N)
    lo, hi = torch.aminmax(probs)
    if not (bool(hi < torch.inf) and bool(lo >= 0) and bool((probs.sum(-1) > 0).all())):
        return torch.multinomial(probs, 1, replacement=True, generator=generator).view(N)  # raises torch's error
    out = torch.empty(N, dtype=torch.int64)
    rows = max(1, (1 << 20) // V)  # <= 8 MB of random bits at a time: one buffer, reused
    bits = torch.empty(min(rows, N), V, dtype=torch.int64)
    for r0 in range(0, N, rows):
        b = bits[:min(rows, N - r0)].random_(generator=generator)  # the stream of exponential_, in order
        cand = candidates[r0:r0 + b.shape[0]]
        u = b.gather(1, cand).bitwise_and_(_MANTISSA).double().mul_(2.0 ** -53)
        q = u.neg_().log1p_().neg_().float()  # torch's exponential(): -1 / lambda * log1p(-u), lambda = 1
        ratio = probs[r0:r0 + b.shape[0]].gather(1, cand).div_(q)
        # argmax over the row in id order: the smallest id among equal maxima
        best = ratio.amax(-1, keepdim=True)
        out[r0:r0 + b.shape[0]] = torch.where(ratio == best, cand, V).amin(-1)
    return out


def _exact_draw_ok() -> bool:
    """Does ``multinomial_one``'s draw reproduce this torch's CPU ``exponential_`` bit for bit
    (values and the generator state after)? Probed once per process."""
    if "cpu" not in _EXACT_DRAW:
        g1, g2 = torch.Generator().manual_seed(2024), torch.Generator().manual_seed(2024)
        q = torch.empty(64, 512).exponential_(1, generator=g1)
        u = torch.empty(64, 512, dtype=torch.int64).random_(generator=g2).bitwise_and_(_MANTISSA)
        mine = u.double().mul_(2.0 ** -53).neg_().log1p_().neg_().float()
        _EXACT_DRAW["cpu"] = torch.equal(q, mine) and torch.equal(g1.get_state(), g2.get_state())
    return _EXACT_DRAW["cpu"]
