"""Turns a batch of logits into next tokens, each row with its own sampling parameters.

A row's logits are first adjusted if it asks for it (repetition, frequency and presence penalties,
logit bias, tokens banned for now, tokens a grammar does not allow next), then greedy rows take the argmax and sampled rows are scaled by temperature, cut by
top-k and top-p (one sort for the whole batch, only when some row asks for it), then drawn with the
exponential-race trick (`argmax(p / q)`, q ~ Exp(1)) so that one call samples the batch while a
seeded request still draws its noise from its own `torch.Generator`. `token_logprobs` reads the
log-probabilities of the chosen tokens (and the best alternatives) off the model's own logits,
before any of those adjustments. Knows nothing of sequences or the scheduler.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class RowParams:
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    generator: torch.Generator | None = None
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the k most likely
    repetition_penalty: float = 1.0  # > 1 discourages every token of the prompt and the output
    frequency_penalty: float = 0.0  # subtracted once per earlier occurrence in the output
    presence_penalty: float = 0.0  # subtracted once if the token occurs in the output
    logit_bias: tuple[tuple[int, float], ...] = ()
    banned: tuple[int, ...] = ()  # never drawn now (e.g. EOS before min_tokens)
    prompt_ids: Sequence[int] = ()  # what the penalties look at
    output_ids: Sequence[int] = ()
    allowed: torch.Tensor | None = (
        None  # packed [ceil(V / 32)] int32: only tokens whose bit is set (a grammar)
    )

    @property
    def adjusts(self) -> bool:
        return bool(
            self.repetition_penalty != 1.0
            or self.frequency_penalty
            or self.presence_penalty
            or self.logit_bias
            or self.banned
            or self.allowed is not None
        )

    @property
    def needs_logits(self) -> bool:
        """Whether this row needs its [V] logits (else its argmax alone decides)."""
        return self.temperature > 0 or self.adjusts or self.logprobs is not None


@dataclass(frozen=True)
class TokenLogprobs:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token, logprob), most likely first


def logit_rows(rows: list[RowParams]) -> list[int]:
    """The rows whose logits `sample` and `token_logprobs` need when given every row's argmax."""
    return [i for i, r in enumerate(rows) if r.needs_logits]


def sample(
    logits: torch.Tensor | None, rows: list[RowParams], argmax: torch.Tensor | None = None
) -> list[int]:
    """logits: [B, V] float32 -> B token ids. With `argmax` [B] (every row's greedy token) given,
    `logits` holds only the rows `logit_rows(rows)` names, in order (None if there are none)."""
    need = logit_rows(rows)
    if argmax is None:
        out, x = logits.argmax(dim=-1), (logits[torch.tensor(need)] if need else None)
    else:
        out, x = argmax.clone(), logits  # [B]; [len(need), V]
    if not need:
        return out.tolist()
    x = _adjust(x, [rows[i] for i in need])
    cold = [j for j, i in enumerate(need) if rows[i].temperature <= 0 and rows[i].adjusts]
    if cold:
        out[torch.tensor([need[j] for j in cold])] = x[torch.tensor(cold)].argmax(dim=-1)
    hot = [j for j, i in enumerate(need) if rows[i].temperature > 0]
    if not hot:
        return out.tolist()
    idx = [need[j] for j in hot]
    if len(hot) < len(need):
        x = x[torch.tensor(hot)]
    V = x.shape[-1]
    x = x / torch.tensor([rows[i].temperature for i in idx], dtype=x.dtype)[:, None]
    top_k = [rows[i].top_k if 0 < rows[i].top_k < V else V for i in idx]
    top_p = [rows[i].top_p for i in idx]
    if any(k < V for k in top_k) or any(p < 1.0 for p in top_p):
        x = _filter(x, torch.tensor(top_k), torch.tensor(top_p, dtype=x.dtype))
    probs = torch.softmax(x, dim=-1)  # [b, V]
    q = torch.empty_like(probs)
    unseeded = [j for j, i in enumerate(idx) if rows[i].generator is None]
    if unseeded:
        q[unseeded] = torch.empty(len(unseeded), V, dtype=probs.dtype).exponential_()
    for j, i in enumerate(idx):
        if rows[i].generator is not None:
            q[j].exponential_(generator=rows[i].generator)
    out[torch.tensor(idx)] = (probs / q).argmax(dim=-1)
    return out.tolist()


def token_logprobs(
    logits: torch.Tensor | None, rows: list[RowParams], tokens: list[int], all_rows: bool = False
) -> list[TokenLogprobs | None]:
    """The log-probability of each row's chosen token and, with `logprobs=k`, its k most likely
    tokens, under the model's distribution (before penalties, bias, temperature, top-k/top-p, as
    vLLM reports them by default); None for rows that did not ask. `logits` as `sample` got them
    (every row's with `all_rows`)."""
    out: list[TokenLogprobs | None] = [None] * len(rows)
    need = list(range(len(rows))) if all_rows else logit_rows(rows)
    which = [(j, i) for j, i in enumerate(need) if rows[i].logprobs is not None]
    if not which:
        return out
    lp = torch.log_softmax(logits[torch.tensor([j for j, _ in which])].float(), dim=-1)
    kmax = max(rows[i].logprobs for _, i in which)
    best = lp.topk(min(kmax, lp.shape[-1]), dim=-1) if kmax else None
    chosen = lp.gather(1, torch.tensor([[tokens[i]] for _, i in which])).squeeze(1).tolist()
    for r, (_, i) in enumerate(which):
        k = rows[i].logprobs
        top = ()
        if k:
            top = tuple(zip(best.indices[r, :k].tolist(), best.values[r, :k].tolist(), strict=True))
        out[i] = TokenLogprobs(tokens[i], chosen[r], top)
    return out


def _adjust(x: torch.Tensor, rows: list[RowParams]) -> torch.Tensor:
    """x [b, V] with each row's penalties and logit bias applied (a copy if any row has some).
    Repetition (as transformers and vLLM define it): a token of the prompt or output has a positive
    logit divided by the penalty, a negative one multiplied; frequency and presence (OpenAI's):
    logit -= frequency * count in the output + presence * (count > 0)."""
    if not any(r.adjusts for r in rows):
        return x
    x = x.clone()
    for j, r in enumerate(rows):
        if r.repetition_penalty != 1.0 and (r.prompt_ids or r.output_ids):
            seen = torch.tensor(list(r.prompt_ids) + list(r.output_ids)).unique()
            v = x[j, seen]
            x[j, seen] = torch.where(v > 0, v / r.repetition_penalty, v * r.repetition_penalty)
        if (r.frequency_penalty or r.presence_penalty) and r.output_ids:
            ids, counts = torch.tensor(list(r.output_ids)).unique(return_counts=True)
            x[j, ids] -= r.frequency_penalty * counts.to(x.dtype) + r.presence_penalty
        if r.logit_bias:
            ids = torch.tensor([t for t, _ in r.logit_bias])
            x[j, ids] += torch.tensor([b for _, b in r.logit_bias], dtype=x.dtype)
        if r.banned:
            x[j, torch.tensor(r.banned)] = float("-inf")
        if r.allowed is not None:
            x[j].masked_fill_(~unpack_bits(r.allowed, x.shape[-1]), float("-inf"))
    return x


def unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """[W] int32 with bit t of word t // 32 standing for item t -> [n] bool. numpy's unpackbits on the
    little-endian bytes: unpack + mask of one row of Qwen's vocabulary ~2 ms here, against ~50 ms
    with a shift-and-mask in torch (both measured on the busy 2-core VM)."""
    le = words.contiguous().numpy().astype("<i4", copy=False)  # little-endian bytes on any host
    bits = np.unpackbits(le.view(np.uint8), bitorder="little")
    return torch.from_numpy(bits[:n].view(np.bool_))


def _filter(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p nucleus to -inf. x: [b, V]."""
    sorted_x, order = x.sort(dim=-1, descending=True)
    ranks = torch.arange(x.shape[-1])[None, :]
    drop = ranks >= top_k[:, None]
    probs = sorted_x.masked_fill(drop, float("-inf")).softmax(dim=-1)  # nucleus within the top-k
    before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
    drop |= before >= top_p[:, None]
    drop[:, 0] = False  # always keep the best token
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(-1, order, sorted_x)
