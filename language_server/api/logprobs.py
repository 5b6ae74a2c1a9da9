"""OpenAI `logprobs` objects from the engine's `TokenLogprobs`: chat's `{"content": [...]}` entries
(token, logprob, bytes, top_logprobs) and the legacy completions' parallel lists (tokens,
token_logprobs, top_logprobs, text_offset).

A token's text is what the tokenizer decodes it to on its own; its `bytes` are the token's exact
bytes (a byte-level BPE token may hold part of a UTF-8 character, which its text shows as U+FFFD).
"""

from __future__ import annotations

from functools import lru_cache

from language_server.engine.sampler import TokenLogprobs


def _byte_level_alphabet() -> dict[str, int]:
    """The printable character byte-level BPE vocabularies (GPT-2's, Qwen's) use for each byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {chr(b): b for b in keep}, 0
    for b in range(256):
        if b not in keep:
            out[chr(256 + extra)] = b
            extra += 1
    return out


_BYTE_OF = _byte_level_alphabet()


class TokenText:
    """Text and bytes of single token ids, cached (a vocabulary is at most a few 100k entries)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.text = lru_cache(maxsize=65536)(self._text)
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _bytes(self, token: int) -> list[int]:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if isinstance(piece, str) and piece and all(c in _BYTE_OF for c in piece):
            return [_BYTE_OF[c] for c in piece]
        return list(self._text(token).encode("utf-8"))  # a special or added token: its own text

    def chat(self, lps: list[TokenLogprobs]) -> dict:
        """The chat completion's `logprobs` for these tokens."""

        def entry(token: int, logprob: float) -> dict:
            return {"token": self.text(token), "logprob": logprob, "bytes": self.bytes(token)}

        return {
            "content": [
                {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                for lp in lps
            ]
        }

    def completion(self, lps: list[TokenLogprobs], offset: int = 0) -> dict:
        """The legacy completion's `logprobs`: `top_logprobs` maps token text to logprob for the k
        best and the chosen token (OpenAI's "up to logprobs + 1"); offsets count characters from
        `offset` (where these tokens' text starts in the choice's text)."""
        tokens, offsets, top = [], [], []
        for lp in lps:
            t = self.text(lp.token)
            tokens.append(t)
            offsets.append(offset)
            offset += len(t)
            best = {self.text(i): v for i, v in lp.top}
            best.setdefault(t, lp.logprob)
            top.append(best)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": top,
            "text_offset": offsets,
        }

    def prompt(self, prompt_ids: list[int], lps: tuple[TokenLogprobs, ...]) -> dict:
        """The echoed prompt's part of a legacy completion's `logprobs` (tokens 1.. scored in `lps`;
        the first token has nothing before it: null, as in OpenAI's and vLLM's answers)."""
        out = self.completion(list(lps), len(self.text(prompt_ids[0])))
        return {
            "tokens": [self.text(prompt_ids[0])] + out["tokens"],
            "token_logprobs": [None] + out["token_logprobs"],
            "top_logprobs": [None] + out["top_logprobs"],
            "text_offset": [0] + out["text_offset"],
        }


def joined(*parts: dict) -> dict:
    """Legacy completion `logprobs` of consecutive pieces of text as one."""
    return {key: [x for p in parts for x in p[key]] for key in parts[0]}
