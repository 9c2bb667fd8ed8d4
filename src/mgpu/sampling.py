"""Sampling parameters (validated, vLLM-compatible names) and the batched sampler.

The sampler runs on the one rank that returns tokens (TP rank 0 of the last pipeline stage) and
keeps per-sequence state there: a seeded generator and the counts of generated tokens for the
penalties. That state survives pre-emption, so a recomputed sequence continues its random stream
and penalties.

Validation is against what the sampler computes, in float32, not only against OpenAI's documented
ranges: a value the sampler cannot use fails its request with a :class:`SamplingParamsError`
naming the field, and the sampler itself fails one sequence, never the batch (see
:class:`SampleResult`'s ``error``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from mgpu.errors import MgpuError

#: Seeds are taken modulo 2**64 (the range of torch's generators), so any integer is a valid seed.
SEED_MODULUS = 2**64
#: Most stop strings in one request, and the longest one (characters).
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
#: Most stop token ids in one request.
MAX_STOP_TOKEN_IDS = 256
#: Most alternatives ``logprobs`` may ask for at each position.
MAX_LOGPROBS = 20
#: ``repetition_penalty`` range: outside it, dividing a logit by the penalty overflows or flattens
#: float32 logits past the point where the distribution means anything.
REPETITION_PENALTY_RANGE = (1e-2, 1e2)
#: Largest temperature: beyond it the distribution is uniform to float32 precision for any
#: usual logits, and infinity (or a value that overflows float32) would turn them into NaN.
MAX_TEMPERATURE = 1e4
#: Temperatures below this sample greedily (dividing by them would overflow float32 logits).
GREEDY_TEMPERATURE = 1e-5
#: Test-only fault injection: when set in a worker's environment, sampling any sequence whose
#: ``seed`` equals this value raises inside the sampler (see the server's failure-isolation tests).
SAMPLER_FAULT_ENV = "MGPU_TEST_SAMPLER_FAULT"


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
        temperature: 0 (or anything below 1e-5) means greedy (argmax); at most 1e4.
        top_p: keep the smallest set of tokens whose probability reaches top_p (1 = all).
        top_k: keep the k most likely tokens (0 or -1 = all; more than the vocabulary = all).
        min_p: drop tokens less likely than min_p x the most likely one.
        seed: seeds this request's own random stream (reproducible sampling); any integer,
            taken modulo 2**64.
        max_tokens: at most this many new tokens (None = up to the context length).
        stop: strings that end the completion (not included in the text); at most 16, each at
            most 256 characters of encodable (UTF-8) text.
        stop_token_ids: token ids that end the completion (besides EOS); at most 256.
        ignore_eos: keep generating past EOS.
        presence_penalty, frequency_penalty: OpenAI penalties on already-generated tokens.
        repetition_penalty: CTRL-style multiplicative penalty (1 = off), in [0.01, 100].
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
            ("n", _is_int(self.n) and self.n >= 1, "must be an integer of at least 1"),
            (
                "temperature",
                0 <= self.temperature <= MAX_TEMPERATURE,
                f"must be in [0, {MAX_TEMPERATURE:g}]",
            ),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            (
                "top_k",
                _is_int(self.top_k) and self.top_k >= -1,
                "must be -1, 0 (disabled) or a positive number",
            ),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("seed", self.seed is None or _is_int(self.seed), "must be an integer"),
            (
                "max_tokens",
                self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
                "must be at least 1",
            ),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            (
                "repetition_penalty",
                _within(self.repetition_penalty, *REPETITION_PENALTY_RANGE),
                "must be in [{:g}, {:g}]".format(*REPETITION_PENALTY_RANGE),
            ),
            (
                "logprobs",
                self.logprobs is None
                or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
                f"must be in [0, {MAX_LOGPROBS}]",
            ),
            (
                "stop",
                len(self.stop) <= MAX_STOP_STRINGS,
                f"must have at most {MAX_STOP_STRINGS} strings",
            ),
            (
                "stop",
                all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH for s in self.stop),
                f"must be non-empty strings of at most {MAX_STOP_LENGTH} characters",
            ),
            ("stop", all(is_encodable(s) for s in self.stop), "must be valid Unicode text"),
            (
                "stop_token_ids",
                len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS
                and all(_is_int(t) for t in self.stop_token_ids),
                f"must be at most {MAX_STOP_TOKEN_IDS} integers",
            ),
        ]
        for name, ok, why in checks:
            if not ok:
                raise SamplingParamsError(name, f"{name} {why}, got {_shown(getattr(self, name))}")

    @property
    def is_greedy(self) -> bool:
        """Whether the token is the argmax (no randomness)."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        """Whether any penalty needs the sequence's token history."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)


def _within(value: float, low: float, high: float) -> bool:
    return low <= value <= high  # false for NaN


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_encodable(text: object) -> bool:
    """Whether ``text`` is a string that UTF-8 can encode (no lone surrogates)."""
    if not isinstance(text, str):
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(value: object) -> str:
    """``value`` for an error message: escaped, and cut short when it is long."""
    text = ascii(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


@dataclass
class SampleResult:
    """One sampled token with its log-probability and the top alternatives when asked for.

    ``error`` is set instead when this sequence could not be sampled (NaN logits, a sampler
    failure): the engine then fails that sequence's request alone, and ``token_id`` is meaningless.
    """

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    error: str | None = None


class _SeqState:
    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device):
        self.params = params
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed % SEED_MODULUS)
        self.counts = (
            torch.zeros(vocab_size, dtype=torch.int32, device=device)
            if params.has_penalties
            else None
        )


class Sampler:
    """Turns the last-position logits of a batch of sequences into next tokens.

    A sequence that cannot be sampled gets a result with ``error`` set; the others in the batch
    are sampled as usual, so one request's failure never reaches the rest.

    Args:
        vocab_size: the model's vocabulary (logits may be padded beyond it).
        device: where the logits and the per-sequence state live.
    """

    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size, self.device = vocab_size, device
        self.states: dict[int, _SeqState] = {}
        self.failed: dict[int, str] = {}
        fault = os.environ.get(SAMPLER_FAULT_ENV)
        self._fault_seed = int(fault) if fault else None

    def add(self, seq_id: int, params: SamplingParams) -> None:
        """Start tracking a sequence (its generator and penalty counts).

        A sequence whose state cannot be made is remembered as failed: its rows get an error
        result, and this call does not raise (it runs in the worker, for the whole batch).
        """
        try:
            self.states[seq_id] = _SeqState(params, self.vocab_size, self.device)
        except Exception as exc:
            self.failed[seq_id] = f"cannot set up sampling: {type(exc).__name__}: {exc}"

    def remove(self, seq_id: int) -> None:
        """Forget a finished or aborted sequence."""
        self.states.pop(seq_id, None)
        self.failed.pop(seq_id, None)

    def __call__(self, seq_ids: list[int], logits: torch.Tensor) -> list[SampleResult]:
        """Sample one token per row of ``logits`` (batch, vocab) float32.

        Rows of a sequence whose state could not be set up are failed without sampling; rows
        with a NaN, or whose probabilities are not finite, get an error result from the batch.
        When the batched path raises, each row is sampled on its own, so only the rows that
        fail alone get an error result; the seeded generators are rewound first, so the retried
        rows draw what they would have drawn.
        """
        results: list[SampleResult | None] = [None] * len(seq_ids)
        for i, seq_id in enumerate(seq_ids):
            error = self.failed.get(seq_id)
            if error is not None:
                results[i] = SampleResult(0, error=error)
        good = [i for i, r in enumerate(results) if r is None]
        if good:
            ids = [seq_ids[i] for i in good]
            seeded = [st.generator for s in ids if (st := self.states.get(s)) and st.generator]
            saved = [g.get_state() for g in seeded]
            rows = logits[good] if len(good) < len(seq_ids) else logits  # (good, vocab)
            try:
                batch = self._sample_batch(ids, rows)
            except Exception:
                for generator, state in zip(seeded, saved, strict=True):
                    generator.set_state(state)
                pairs = zip(ids, good, strict=True)
                batch = [self._sample_alone(s, logits[i : i + 1]) for s, i in pairs]
            for i, result in zip(good, batch, strict=True):
                results[i] = result
        return [r for r in results if r is not None]

    def _sample_alone(self, seq_id: int, logits: torch.Tensor) -> SampleResult:
        """One sequence's token, or an error result saying why it could not be sampled."""
        try:
            return self._sample_batch([seq_id], logits)[0]
        except Exception as exc:
            return SampleResult(0, error=f"sampling failed: {type(exc).__name__}: {exc}")

    def _sample_batch(self, seq_ids: list[int], logits: torch.Tensor) -> list[SampleResult]:
        """The batch on tensors, then one transfer to the host: tokens, per-row error codes and,
        when asked for, log-probabilities."""
        states = [self.states[s] for s in seq_ids]
        params = [s.params for s in states]
        if self._fault_seed is not None and any(p.seed == self._fault_seed for p in params):
            raise RuntimeError(f"fault injected by {SAMPLER_FAULT_ENV}={self._fault_seed}")
        errors = torch.isnan(logits).any(dim=-1).long()  # (batch,) 1: NaN logits
        penalised = [row for row, state in enumerate(states) if state.counts is not None]
        if penalised:
            logits = logits.clone()
            logits[penalised] = _penalise(
                logits[penalised], [states[row] for row in penalised]
            )  # (P, vocab)
        tokens = logits.argmax(dim=-1)  # (batch,) greedy
        sampled = [row for row, p in enumerate(params) if not p.is_greedy]
        if sampled:
            choice, finite = self._draw(
                logits[sampled], [params[r] for r in sampled], [states[r] for r in sampled]
            )
            tokens[sampled] = choice
            errors[sampled] = torch.where(finite, errors[sampled], 2)  # 2: non-finite probs
        packed = [tokens, errors]
        top = max((p.logprobs or 0 for p in params), default=0)
        wants_logprobs = any(p.logprobs is not None for p in params)
        if wants_logprobs:
            # Log-probabilities are reported from the model's distribution (after penalties,
            # before temperature and truncation), as OpenAI and vLLM report them.
            logprobs = torch.log_softmax(logits, dim=-1)  # (batch, vocab)
            packed.append(logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1))
            if top > 0:
                values, indices = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
                packed += [values.flatten(), indices.flatten()]
        host = torch.cat([t.double() for t in packed]).tolist()  # the step's one transfer
        batch = len(seq_ids)
        results = []
        for row, p in enumerate(params):
            token, code = int(host[row]), int(host[batch + row])
            if code:
                results.append(SampleResult(0, error=_ERRORS[code]))
                continue
            result = SampleResult(token)
            if p.logprobs is not None:
                result.logprob = host[2 * batch + row]
                width = min(top, logits.shape[-1])
                start = 3 * batch + row * width
                values = host[start : start + p.logprobs]
                indices = host[start + batch * width : start + batch * width + p.logprobs]
                if p.logprobs > 0:
                    result.top_logprobs = [
                        (int(i), v) for i, v in zip(indices, values, strict=True)
                    ]
            results.append(result)
        # Only once nothing can raise any more: a retried row must not count its token twice.
        for result, state in zip(results, states, strict=True):
            if state.counts is not None and result.error is None:
                state.counts[result.token_id] += 1
        return results

    @staticmethod
    def _draw(
        logits: torch.Tensor, params: list[SamplingParams], states: list[_SeqState]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random tokens of (R, vocab) logits: (R,) tokens and (R,) whether each row's
        probabilities were finite (a row that is not draws from a uniform stand-in)."""
        temps = torch.tensor([p.temperature for p in params], device=logits.device)
        probs = torch.softmax(logits / temps.unsqueeze(1), dim=-1)  # (R, vocab)
        probs = _truncate(probs, params)
        finite = torch.isfinite(probs).all(dim=-1)  # (R,)
        probs = torch.where(finite.unsqueeze(1), probs, 1.0)
        generators = [s.generator for s in states]
        if probs.device.type == "cpu":
            return _multinomial(probs, generators), finite
        return exponential_race(probs, generators), finite


def _multinomial(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """(R,) tokens of (R, vocab) probabilities: one ``multinomial`` for the unseeded rows and one
    per seeded row from its generator (on CPU there is no device to wait for, and this draws
    far fewer random numbers than the exponential race)."""
    tokens = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    unseeded = [row for row, g in enumerate(generators) if g is None]
    if unseeded:
        tokens[unseeded] = torch.multinomial(probs[unseeded], 1).squeeze(1)
    for row, generator in enumerate(generators):
        if generator is not None:
            tokens[row : row + 1] = torch.multinomial(probs[row], 1, generator=generator)
    return tokens


def exponential_race(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """(R,) tokens of (R, vocab) probabilities as the argmax of ``probs / E``, E exponential
    draws: token i wins with probability ``probs[i]``. Unlike ``multinomial`` on CUDA it never
    waits for the device (gpt-fast samples the same way). Seeded rows draw E from their own
    generators, the others in one call."""
    race = torch.empty_like(probs)  # (R, vocab)
    unseeded = [row for row, g in enumerate(generators) if g is None]
    if unseeded:
        race[unseeded] = torch.empty_like(race[unseeded]).exponential_()
    for row, generator in enumerate(generators):
        if generator is not None:
            race[row].exponential_(generator=generator)
    tiny = torch.finfo(probs.dtype).tiny
    return (probs / race.clamp_min(tiny)).argmax(dim=-1)


#: Error results of the codes ``_sample_batch`` computes per row.
_ERRORS = {
    1: "the model produced NaN logits",
    2: "sampling failed: the probabilities are not finite (infinite logits)",
}


def _penalise(logits: torch.Tensor, states: list[_SeqState]) -> torch.Tensor:
    """(P, vocab) logits with each row's repetition, frequency and presence penalties applied
    for the tokens its sequence has generated."""
    counts = torch.stack([s.counts for s in states if s.counts is not None])  # (P, vocab)
    device = logits.device

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=logits.dtype, device=device).unsqueeze(1)  # (P, 1)

    repetition = column([s.params.repetition_penalty for s in states])
    frequency = column([s.params.frequency_penalty for s in states])
    presence = column([s.params.presence_penalty for s in states])
    seen = counts > 0
    scaled = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, scaled, logits)
    return logits - (frequency * counts + presence * seen)


def _truncate(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Apply top-k, top-p and min-p to (R, vocab) probabilities; rows are renormalised."""
    vocab = probs.shape[-1]
    # A top_k beyond the vocabulary keeps every token (vLLM clamps it the same way).
    top_k = torch.tensor(
        [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=probs.device
    )
    top_p = torch.tensor([p.top_p for p in params], device=probs.device)
    min_p = torch.tensor([p.min_p for p in params], device=probs.device)
    if any(0 < p.top_k < vocab or p.top_p < 1 for p in params):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=probs.device).unsqueeze(0)
        # Mass strictly before each token: a token is kept while that mass is below top_p. The
        # most likely token always survives, also when top_p underflows to 0 in float32.
        before = sorted_p.cumsum(dim=-1) - sorted_p
        drop = (rank >= top_k.unsqueeze(1)) | (before >= top_p.unsqueeze(1))
        drop[:, 0] = False
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    if any(p.min_p > 0 for p in params):
        threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)
