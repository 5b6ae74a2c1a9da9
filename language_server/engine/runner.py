"""Owns the tensors: the language model, the paged KV cache, each request's vision rows and RNG.

`run(out)` turns the scheduler's plan into ONE flattened forward (prefill chunks and decodes of many
sequences together), scatters vision rows and deepstack into the chunks that cover image pads, and
samples the next token of every sequence whose chunk reached its end. For a request that asks for its
prompt's log-probabilities it reads them off the prefill chunks' rows (`prompt_logprobs`). It frees a
request's receive buffer (`MultimodalInputs.release`) once prefill has read all its rows. No
scheduling decisions here.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch

from deepsplit import native
from deepsplit.model.attention import AttentionMetadata, PagedKVCache
from language_server.engine.sampler import RowParams, TokenLogprobs, logit_rows, sample, token_logprobs
from language_server.engine.scheduler import SchedulerOutput
from language_server.mm.base import MultimodalInputs


@dataclass
class _Vision:
    inputs: MultimodalInputs
    rows_before: torch.Tensor  # [N + 1] long: vision rows among prompt tokens [0, i)
    is_image: torch.Tensor  # [N] bool
    consumed_at: int  # prefill has read every vision row once tokens [0, consumed_at) are computed


class ModelRunner:
    def __init__(
        self, lm, cfg, num_blocks: int, block_size: int, eos_ids: tuple[int, ...] = (), grammars=None
    ) -> None:
        t = cfg.text
        self.lm, self.cfg, self.block_size = lm.pack_weights(), cfg, block_size
        self.eos_ids = tuple(eos_ids)  # what min_tokens keeps from ending an output early
        native.load()  # build the native kernels now (once per machine), not in the first decode step
        self.dtype = lm.lm_head.weight.dtype
        self.hidden = t.hidden_size
        self.kv = PagedKVCache(
            t.num_hidden_layers, num_blocks, block_size, t.num_key_value_heads, t.head_dim, dtype=self.dtype
        )
        self._vision: dict[str, _Vision] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._prompt_lps: dict[str, dict[int, TokenLogprobs]] = {}  # seq id -> prompt position -> ...
        self.grammars = grammars  # engine/grammar.py Grammars, for requests with structured output
        self._matchers: dict = {}  # seq id -> its grammar Matcher
        self.last_step_s = 0.0

    @staticmethod
    def blocks_for_bytes(cfg, nbytes: int, block_size: int, dtype: torch.dtype) -> int:
        t = cfg.text
        per = PagedKVCache.bytes_per_block(
            t.num_hidden_layers, block_size, t.num_key_value_heads, t.head_dim, dtype
        )
        return nbytes // per

    # -- per-request tensors ------------------------------------------------------------------
    def add_vision(self, seq_id: str, inputs: MultimodalInputs) -> None:
        is_image = inputs.fill_ids == self.cfg.image_token_id
        before = torch.zeros(len(is_image) + 1, dtype=torch.long)
        torch.cumsum(is_image.long(), 0, out=before[1:])
        if int(before[-1]) != inputs.embeddings.shape[0]:
            raise ValueError(f"{int(before[-1])} image pads but {inputs.embeddings.shape[0]} vision rows")
        pads = torch.nonzero(is_image).squeeze(1)
        consumed_at = int(pads[-1]) + 1 if pads.numel() else 0
        self._vision[seq_id] = _Vision(inputs, before, is_image, consumed_at)

    def block_extras(self, seq_id: str) -> dict[int, bytes]:
        """Per KV block holding image pads, a digest of those pads' vision rows and M-RoPE positions:
        what a block's token ids cannot tell apart (`prefix.py`). Only the embeddings are read, the
        deepstack rows come from the same image. ~1 GB/s here: 4 ms for an image of 1024 pads at
        2048 bf16 wide."""
        v = self._vision.get(seq_id)
        if v is None:
            return {}
        bs, n = self.block_size, v.is_image.numel()
        emb = v.inputs.embeddings
        out = {}
        for i in range((n + bs - 1) // bs):
            a, b = i * bs, min((i + 1) * bs, n)
            r0, r1 = int(v.rows_before[a]), int(v.rows_before[b])
            if r1 == r0:
                continue
            h = hashlib.blake2b(digest_size=16)
            h.update(emb[r0:r1].contiguous().view(torch.uint8).numpy())
            h.update(v.inputs.positions[:, a:b][:, v.is_image[a:b]].contiguous().numpy())
            out[i] = h.digest()
        return out

    def release(self, seq_id: str) -> None:
        """The request finished or was aborted: drop its tensors and free its receive buffer."""
        v = self._vision.pop(seq_id, None)
        if v is not None:
            v.inputs.release()
        self._generators.pop(seq_id, None)
        self._prompt_lps.pop(seq_id, None)
        self._matchers.pop(seq_id, None)

    def grammar_ended(self, seq_id: str) -> bool:
        """The sequence's grammar is complete (its last token was the stop token it then allows)."""
        m = self._matchers.get(seq_id)
        return m is not None and m.ended

    def prompt_logprobs(self, seq_id: str) -> tuple[TokenLogprobs, ...]:
        """The log-probabilities of prompt tokens 1..N-1 (each given the tokens before it), once
        prefill computed them all; taken, not kept."""
        got = self._prompt_lps.pop(seq_id, {})
        return tuple(got[p] for p in sorted(got))

    # -- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, out: SchedulerOutput) -> dict[str, tuple[int, TokenLogprobs | None]]:
        """seq id -> (next token, its log-probabilities if the request asked) for every sequence
        whose chunk reached its end."""
        t0 = time.perf_counter()
        bs = self.block_size
        ids: list[int] = []
        slots: list[int] = []
        pos: list = []  # per sequence: a range of text positions (all three axes) or a [3, n] tensor
        vis_parts, sample_rows, sample_seqs, prompt_parts = [], [], [], []
        qlens, clens, tables = [], [], []
        row = 0
        for s in out.scheduled:
            seq, a, n = s.seq, s.start, s.num_tokens
            b = a + n
            ids.extend(seq.token_ids(a, b))
            pos.append(self._positions(seq, a, b))
            table = seq.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in range(a, b))
            tables.append(table)
            qlens.append(n)
            clens.append(a)
            v = self._vision.get(seq.id)
            if (
                v is not None
                and a < v.is_image.numel()
                and int(v.rows_before[min(b, v.is_image.numel())]) > int(v.rows_before[a])
            ):
                vis_parts.append((row, a, b, v))
            if s.samples:
                sample_rows.append(row + n - 1)
                sample_seqs.append(seq)
            if seq.params.prompt_logprobs is not None and a < seq.num_prompt - 1 and not seq.output_ids:
                # (a prefill recomputed after a preemption finds them delivered with the first token)
                prompt_parts.append((row, seq, a, min(b, seq.num_prompt - 1)))
            row += n
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
        ids_t = torch.tensor(ids, dtype=torch.long)
        meta = AttentionMetadata(qlens, clens, torch.tensor(slots, dtype=torch.long), block_tables)
        emb, ds = self._vision_inputs(ids_t, vis_parts)
        hidden = self.lm(ids_t, _stack_positions(pos), meta, self.kv, emb, ds)
        self._release_consumed(out)
        for part in prompt_parts:
            self._score_prompt(hidden, *part)
        result: dict[str, tuple[int, TokenLogprobs | None]] = {}
        if sample_rows:
            if len(sample_rows) < row:
                hidden = hidden[torch.tensor(sample_rows)]
            params = [self._row_params(seq) for seq in sample_seqs]
            best, logits = self.lm.sample_logits(hidden, logit_rows(params))
            toks = sample(logits, params, best)
            for seq, t in zip(sample_seqs, toks, strict=True) if self._matchers else ():
                m = self._matchers.get(seq.id)
                if m is not None and not m.accept(t):  # cannot happen: the mask allowed only these
                    raise RuntimeError(f"grammar of {seq.id} refused token {t} it allowed")
            lps = token_logprobs(logits, params, toks)
            result = {seq.id: (t, lp) for seq, t, lp in zip(sample_seqs, toks, lps, strict=True)}
        self.last_step_s = time.perf_counter() - t0
        return result

    def _score_prompt(self, hidden: torch.Tensor, row: int, seq, a: int, upto: int) -> None:
        """Rows [row, row + upto - a) of this step's hidden states are prompt positions [a, upto):
        each one's logits give the log-probability of the prompt token after it (and its k best),
        PROMPT_LOGPROBS_ROWS rows at a time so no [N, V] tensor is ever whole."""
        k = seq.params.prompt_logprobs
        got = self._prompt_lps.setdefault(seq.id, {})
        for c in range(a, upto, PROMPT_LOGPROBS_ROWS):
            d = min(upto, c + PROMPT_LOGPROBS_ROWS)
            h = hidden[row + c - a : row + d - a]
            _, logits = self.lm.sample_logits(h, list(range(d - c)))
            targets = seq.prompt_ids[c + 1 : d + 1]
            rows = [RowParams(0.0, logprobs=k)] * (d - c)
            for p, lp in enumerate(token_logprobs(logits, rows, targets, all_rows=True), start=c + 1):
                got[p] = lp  # by position: a prefill recomputed after preemption overwrites

    def _positions(self, seq, a: int, b: int) -> range | torch.Tensor:
        """M-RoPE positions of tokens [a, b): the prompt's own [3, b - a], then index + delta (a range
        when all three axes are equal)."""
        v = self._vision.get(seq.id)
        if v is None or a >= v.is_image.numel():
            return range(a + seq.mrope_delta, b + seq.mrope_delta)
        n = v.is_image.numel()
        parts = []
        if a < n:
            parts.append(v.inputs.positions[:, a : min(b, n)])
        if b > n:
            s = max(a, n)
            parts.append(torch.arange(s + seq.mrope_delta, b + seq.mrope_delta).expand(3, -1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def _vision_inputs(self, ids: torch.Tensor, parts) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Embeddings [T, H] with vision rows scattered in, and deepstack [T, n_ds*H] (zero on text)."""
        if not parts:
            return None, None
        emb = self.lm.model.embed_tokens(ids)
        ds = emb.new_zeros(ids.numel(), parts[0][3].inputs.deepstack.shape[1])
        for row, a, b, v in parts:
            n = v.is_image.numel()
            e = min(b, n)
            local = torch.nonzero(v.is_image[a:e]).squeeze(1) + row  # [r] step rows of the pads
            r0, r1 = int(v.rows_before[a]), int(v.rows_before[e])
            emb[local] = v.inputs.embeddings[r0:r1].to(emb.dtype)
            ds[local] = v.inputs.deepstack[r0:r1].to(ds.dtype)
        return emb, ds

    def _release_consumed(self, out: SchedulerOutput) -> None:
        """Prefill has read the last vision row: keep a private copy (for recompute after preemption)
        and free the receive buffer the rows came in."""
        for s in out.scheduled:
            v = self._vision.get(s.seq.id)
            if v is not None and v.inputs.on_consumed is not None and s.start + s.num_tokens >= v.consumed_at:
                v.inputs.embeddings = v.inputs.embeddings.clone()
                v.inputs.deepstack = v.inputs.deepstack.clone()
                v.inputs.release()

    def _row_params(self, seq) -> RowParams:
        p = seq.params
        banned: tuple[int, ...] = ()
        if len(seq.output_ids) < p.min_tokens:
            banned = tuple(set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_ids)))
        gen = None
        if p.seed is not None and not p.greedy:
            gen = self._generators.get(seq.id)
            if gen is None:
                gen = self._generators[seq.id] = torch.Generator().manual_seed(p.seed)
        allowed = None
        if p.grammar is not None:
            m = self._matchers.get(seq.id)
            if m is None:
                m = self._matchers[seq.id] = self.grammars.matcher(p.grammar)
            allowed = m.allowed()
        return RowParams(
            max(p.temperature, 0.0),
            p.top_p,
            p.top_k,
            gen,
            p.logprobs,
            p.repetition_penalty,
            p.frequency_penalty,
            p.presence_penalty,
            p.logit_bias,
            banned,
            seq.prompt_ids,
            seq.output_ids,
            allowed,
        )


PROMPT_LOGPROBS_ROWS = 32  # prompt rows scored at once: a [32, V] float32 block (~19 MiB for Qwen's V)


def _stack_positions(parts: list) -> torch.Tensor:
    """Per-sequence positions (ranges or [3, n] tensors) -> [3, T]."""
    if all(isinstance(p, range) for p in parts):
        return torch.tensor([i for p in parts for i in p], dtype=torch.long).expand(3, -1)
    return torch.cat(
        [torch.tensor(p, dtype=torch.long).expand(3, -1) if isinstance(p, range) else p for p in parts], dim=1
    )
