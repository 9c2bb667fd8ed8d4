"""Sampling parameters (validated, vLLM-compatible names) and the batched sampler.

The sampler runs on the one rank that returns tokens (TP rank 0 of the last pipeline stage) and
keeps
per-sequence state there: a seeded generator and the counts of generated tokens for the penalties.
That state survives pre-emption, so a recomputed sequence continues its random stream and penalties.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mgpu.errors import MgpuError


class SamplingParamsError(MgpuError, ValueError):
    """An invalid sampling parameter; ``param`` names it (HTTP 400 in the server)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """How to pick each next token, and when to stop.

    Attributes:
        n: completions per prompt.
        temperature: 0 means greedy (argmax).
        top_p: keep the smallest set of tokens whose probability reaches top_p (1 = all).
        top_k: keep the k most likely tokens (0 or -1 = all).
        min_p: drop tokens less likely than min_p x the most likely one.
        seed: seeds this request's own random stream (reproducible sampling).
        max_tokens: at most this many new tokens (None = up to the context length).
        stop: strings that end the completion (not included in the text).
        stop_token_ids: token ids that end the completion (besides EOS).
        ignore_eos: keep generating past EOS.
        presence_penalty, frequency_penalty: OpenAI penalties on already-generated tokens.
        repetition_penalty: CTRL-style multiplicative penalty (1 = off).
        logprobs: return the log-probability of each sampled token and this many top alternatives.
        skip_special_tokens: leave special tokens out of the text.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            ("n", self.n >= 1, "must be at least 1"),
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= -1, "must be -1, 0 (disabled) or a positive number"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be at least 1"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise SamplingParamsError(name, f"{name} {why}, got {getattr(self, name)!r}")

    @property
    def is_greedy(self) -> bool:
        """Whether the token is the argmax (no randomness)."""
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        """Whether any penalty needs the sequence's token history."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)


@dataclass
class SampleResult:
    """One sampled token with its log-probability and the top alternatives when asked for."""

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class _SeqState:
    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device):
        self.params = params
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)
        self.counts = (
            torch.zeros(vocab_size, dtype=torch.int32, device=device)
            if params.has_penalties
            else None
        )


class Sampler:
    """Turns the last-position logits of a batch of sequences into next tokens."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size, self.device = vocab_size, device
        self.states: dict[int, _SeqState] = {}

    def add(self, seq_id: int, params: SamplingParams) -> None:
        """Start tracking a sequence (its generator and penalty counts)."""
        self.states[seq_id] = _SeqState(params, self.vocab_size, self.device)

    def remove(self, seq_id: int) -> None:
        """Forget a finished or aborted sequence."""
        self.states.pop(seq_id, None)

    def __call__(self, seq_ids: list[int], logits: torch.Tensor) -> list[SampleResult]:
        """Sample one token per row of ``logits`` (batch, vocab) float32."""
        states = [self.states[s] for s in seq_ids]
        params = [s.params for s in states]
        if all(p.is_greedy and not p.has_penalties and p.logprobs is None for p in params):
            return [SampleResult(int(t)) for t in logits.argmax(dim=-1).tolist()]
        logits = logits.clone()
        for row, state in enumerate(states):
            if state.counts is not None:
                self._apply_penalties(logits[row], state)
        # Log-probabilities are reported from the model's distribution (after penalties, before
        # temperature and truncation), as OpenAI and vLLM report them.
        logprobs = torch.log_softmax(logits, dim=-1)
        tokens = self._sample(logits, params, [s.generator for s in states])
        results = []
        for row, (token, p, state) in enumerate(zip(tokens, params, states, strict=False)):
            result = SampleResult(token)
            if p.logprobs is not None:
                result.logprob = float(logprobs[row, token])
                if p.logprobs > 0:
                    top = logprobs[row].topk(p.logprobs)
                    pairs = zip(top.indices.tolist(), top.values.tolist(), strict=True)
                    result.top_logprobs = list(pairs)
            if state.counts is not None:
                state.counts[token] += 1
            results.append(result)
        return results

    @staticmethod
    def _apply_penalties(row: torch.Tensor, state: _SeqState) -> None:
        p, counts = state.params, state.counts
        assert counts is not None
        seen = counts > 0
        if p.repetition_penalty != 1:
            penalised = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            row.copy_(torch.where(seen, penalised, row))
        row -= p.frequency_penalty * counts + p.presence_penalty * seen

    def _sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> list[int]:
        greedy = logits.argmax(dim=-1).tolist()
        out = list(greedy)
        rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if not rows:
            return out
        idx = torch.tensor(rows, device=logits.device)
        temps = torch.tensor([params[i].temperature for i in rows], device=logits.device)
        probs = torch.softmax(logits[idx] / temps.unsqueeze(1), dim=-1)  # (R, vocab)
        probs = _truncate(probs, [params[i] for i in rows])
        for j, i in enumerate(rows):
            out[i] = int(torch.multinomial(probs[j], 1, generator=generators[i]))
        return out


def _truncate(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Apply top-k, top-p and min-p to (R, vocab) probabilities; rows are renormalised."""
    vocab = probs.shape[-1]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=probs.device)
    top_p = torch.tensor([p.top_p for p in params], device=probs.device)
    min_p = torch.tensor([p.min_p for p in params], device=probs.device)
    if bool((top_k < vocab).any() or (top_p < 1).any()):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=probs.device).unsqueeze(0)
        # Mass strictly before each token: a token is kept while that mass is below top_p,
        # so the most likely token always survives.
        before = sorted_p.cumsum(dim=-1) - sorted_p
        drop = (rank >= top_k.unsqueeze(1)) | (before >= top_p.unsqueeze(1))
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    if bool((min_p > 0).any()):
        threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)
