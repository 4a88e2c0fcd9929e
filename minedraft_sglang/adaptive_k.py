"""Online choice of how to run each step, from the costs measured so far.

Speculation pays only while drafting k tokens and verifying k + 1 per request
costs less per committed token than a plain decode step; PSD's overlap pays
only while splitting the cores (or devices) between the stages costs less than
it hides. Before each step the planner picks the ``Option`` (mode, k, the
drafter's cores while overlapping) with the highest expected tokens per
second. With a CPU drafter the server's N cores are fungible: a stage that
runs alone gets all N, overlapping stages get d (drafter) and N - d (verify).

Measured online (pure Python, no SGLang, no torch), per core count c (c = 0:
stages on their own devices, cores not managed):

    t_v[c](n, r) one target verify of n tokens of r requests
                 (n = r x (k + 1)): a + b*n + e*r
    t_d[c](r)    one drafter forward over r requests (one token each): a + b*r
    alpha       per-token acceptance, from accepted / offered drafts

A verify's cost has a part per request apart from its tokens. Measured
2026-12-03 (real pair, bf16, 2 cores, docs/benchmarks.md): a k = 3 verify
took 308 ms at 2 requests and 650 ms at 8 (about 57 ms per request of 4
tokens), and a plain step of 8 requests, a quarter of those tokens, 606 ms.
A fit in n alone reads the requests' cost as the tokens' and, after steps at
fewer requests, makes longer chains look dear: the defaults ran k = 1 at 8
requests, at 0.87x the throughput of the fixed k = 3.

Rates compared, for B running requests whose PSD halves are b_v (verified)
and b_d (drafted), L(k) = (1 - alpha^(k+1)) / (1 - alpha) the expected tokens
per verify:

    plain          B / t_v[N](B, B)                                    (k = 0)
    sequential(k)  B * L(k) / (k*t_d[N](B) + t_v[N](B*(k+1), B))
    psd(k, d)      b_v * L(k) / max(k*t_d[d](b_d), t_v[N-d](b_v*(k+1), b_v))
    ahead(k, d)    B * L(k) / (max((k+1)*t_d[d](B), t_v[N-d](B*(k+1), B))
                               + (1 - h^B)*k*t_d[N](max(1, B*(1 - h))))

``ahead`` is draft-ahead (PEARL): a request's next drafts are made during the
verify and are ready when all k drafts and the guessed bonus token were right
(probability h = alpha^(k+1)); otherwise the next step drafts it first,
alone. That costs a whole draft whenever any of the B requests missed
(probability 1 - h^B), for the B*(1 - h) that did: a weight-bound draft of a
few requests costs nearly what one of all does (measured 2026-12-02, real
pair: 44% of draft-ahead steps at 4 requests and 73% at 8 paid one,
docs/benchmarks.md).

An option whose costs are not measured yet rates infinite, so each is tried
once. Explorations then run ``EXPLORE_STEPS`` steps at the option whose
measurements are the oldest (least recently tried among equals), so the fits
cover the widths and core counts they are asked about (a fit from one width
cannot tell the fixed cost of a forward from the cost per token) and
acceptance stays measured while plain steps win. Two steps, because in PSD a
k takes a step to reach the verify (the half verified next was drafted now):
the second is a whole PSD step. Explorations come at decisions ``EXPLORE_FIRST``,
twice that, four times, ... (a server's first measurements are its least
reliable), the interval doubling up to ``EXPLORE_MAX`` while the choice
holds: every exploration runs options that rated worse (2026-12-06, real
pair, 8 requests: a PSD k2 step on split cores committed 11 tokens in 520-570
ms where sequential k3 on both committed about 30 in 730-750 ms,
docs/benchmarks.md). A new choice (the batch or the acceptance moved) brings
the next exploration within ``EXPLORE_AFTER_CHANGE`` decisions.
Otherwise the current option is kept unless another is
``HYSTERESIS`` better, except a sequential one, taken as soon as it rates
higher: a switch into overlapping costs a step whose background drafts are
not ready, one into plain throws away drafts made ahead, while a sequential
step drafts what it lacks and uses what still holds, so a switch to it costs
nothing and a margin would only keep a slower option (measured 2026-12-03:
draft-ahead held at one request while its own sequential steps rated 3%
better, docs/benchmarks.md). Nor is the current option left on a rate it was
not measured at: when the batch has moved since it last ran, it runs once more
at the new batch before another takes over: away from the batches it has seen
a fit extrapolates (2026-12-07, real pair: after steps at 2-4 requests,
sequential k3 at 1 request rated on a 216 ms verify and 33 ms draft forwards
where it took 158 and 22, and the planner ran draft-ahead k3, 0.90x its rate,
for 41 steps until an exploration measured the verify at 1 request,
docs/benchmarks.md). Moving the cores themselves costs microseconds
(``affinity.Team``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from minedraft_sglang.metrics import StepMode

EXPLORE_STEPS = 2
# 2026-12-06: MINEDRAFT's first five steps ran 3-7x slow and, on those
# measurements, it decoded plainly until its first exploration at decision
# 64 (docs/benchmarks.md): the first comes early.
EXPLORE_FIRST = 8
EXPLORE_MAX = 512
EXPLORE_AFTER_CHANGE = 64
HYSTERESIS = 0.05
# Old measurements fade (the batch, the prompts and the machine drift) with
# time, counted in decisions: a fit weighs what it saw in the last
# ~1/(1 - DECAY) steps. Per decision, not per observation: a configuration
# the planner left, measured under a transient (a first use, another
# process's burst), is not believed at that weight when it is measured
# again much later (2026-12-06: one all-core step about 5x slow at startup
# held a server on split cores for all 886 steps of a bench run,
# docs/benchmarks.md).
DECAY = 0.98
# An observation under FASTER x what the fit predicts weighs its elders
# DISCOUNT more lightly: they were taken while something slowed the forward
# (nothing makes one faster than the machine allows; a first use made one
# 3-13x slower, measured 2026-12-06).
# Slower observations only average in: one slow step is not a new regime.
FASTER, DISCOUNT = 0.5, 0.1


def accept_length(alpha: float, k: int) -> float:
    """Expected tokens per verify with k drafts, each accepted with
    probability alpha given its predecessors were (bonus token included)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 1:
        return k + 1.0
    return (1 - alpha ** (k + 1)) / (1 - alpha)


@dataclass
class LinearFit:
    """y = a + b1*x1 + b2*x2 by exponentially weighted least squares
    (b1, b2 >= 0; x2 optional), an observation's weight DECAY**(its age in
    ticks of the caller's clock), and DISCOUNT less for each much faster one
    after it. A feature the observations do not vary apart from the other
    gets no slope of its own: one value seen, or x2 moving only with x1
    (plain steps, whose tokens are their requests); the fit is then the
    better line in the other alone, or a constant."""

    now: int = 0  # the clock's tick of the last observation
    w: float = 0.0
    s1: float = 0.0
    s2: float = 0.0
    sy: float = 0.0
    s11: float = 0.0
    s12: float = 0.0
    s22: float = 0.0
    s1y: float = 0.0
    s2y: float = 0.0

    def add(self, x1: float, y: float, x2: float = 0.0, now: int | None = None) -> None:
        """One observation at tick ``now`` (default: one tick after the last)."""
        now = self.now + 1 if now is None else now
        f = DECAY ** (now - self.now)
        if not self.empty and y < FASTER * self(x1, x2):
            f *= DISCOUNT
        self.now = now
        self.w = f * self.w + 1
        self.s1 = f * self.s1 + x1
        self.s2 = f * self.s2 + x2
        self.sy = f * self.sy + y
        self.s11 = f * self.s11 + x1 * x1
        self.s12 = f * self.s12 + x1 * x2
        self.s22 = f * self.s22 + x2 * x2
        self.s1y = f * self.s1y + x1 * y
        self.s2y = f * self.s2y + x2 * y

    @property
    def empty(self) -> bool:
        return self.w == 0

    def __call__(self, x1: float, x2: float = 0.0) -> float:
        w = self.w
        m1, m2, my = self.s1 / w, self.s2 / w, self.sy / w
        # Weighted (co)variances of the features and with y.
        v11, v22, v12 = self.s11 / w - m1 * m1, self.s22 / w - m2 * m2, self.s12 / w - m1 * m2
        c1, c2 = self.s1y / w - m1 * my, self.s2y / w - m2 * my
        b1, b2 = _slopes(_varied(v11, m1), _varied(v22, m2), v12, c1, c2)
        return max(0.0, my + b1 * (x1 - m1) + b2 * (x2 - m2))


def _varied(variance: float, mean: float) -> float:
    """A feature's variance, or 0 where it is rounding noise around one value."""
    return variance if variance > 1e-9 * max(1.0, mean * mean) else 0.0


def _slopes(v11: float, v22: float, v12: float, c1: float, c2: float) -> tuple[float, float]:
    """Least-squares slopes from the features' variances ``v11``, ``v22``
    (0: not varied), covariance ``v12`` and covariances with y ``c1``,
    ``c2``; both >= 0, else the better one-feature line."""
    det = v11 * v22 - v12 * v12
    if v11 and v22 and det > 1e-6 * v11 * v22:
        b1, b2 = (c1 * v22 - c2 * v12) / det, (c2 * v11 - c1 * v12) / det
        if b1 >= 0 and b2 >= 0:
            return b1, b2
    # One feature: the line that explains more of y's variance (c^2 / v).
    lines = [(max(c1, 0.0) ** 2 / v11, (max(c1, 0.0) / v11, 0.0))] if v11 else []
    lines += [(max(c2, 0.0) ** 2 / v22, (0.0, max(c2, 0.0) / v22))] if v22 else []
    return max(lines)[1] if lines else (0.0, 0.0)


OVERLAP = (StepMode.PSD, StepMode.DRAFT_AHEAD)


@dataclass(frozen=True)
class Option:
    """One way to run a step: ``mode`` with ``k`` drafts per request (k = 0:
    plain); for PSD and draft-ahead, ``draft_cores`` of the server's cores
    draft while the rest verify (0 where cores are not managed)."""

    mode: StepMode
    k: int
    draft_cores: int = 0


def options(k_max: int, modes: set[StepMode], draft_core_counts: list[int]) -> list[Option]:
    """Every option of ``modes``, in the order ties are broken: overlapping
    ones first (the longest chains first), plain last."""
    out = [
        Option(mode, k, d) for k in range(k_max, 0, -1) for mode in OVERLAP if mode in modes for d in draft_core_counts
    ]
    if StepMode.SEQUENTIAL in modes:
        out += [Option(StepMode.SEQUENTIAL, k) for k in range(k_max, 0, -1)]
    return [*out, Option(StepMode.PLAIN, 0)]


def stage_cores(total: int, mode: StepMode, draft_cores: int) -> tuple[int, int]:
    """(verify cores, draft cores) of a step on ``total`` cores: the split's
    parts while the stages overlap, every core for a stage alone."""
    return (total - draft_cores, draft_cores) if mode in OVERLAP else (total, total)


@dataclass
class KPlanner:
    k_max: int
    # The server's cores (0: stages on their own devices, not managed), and
    # the drafter's core counts it may overlap on.
    total_cores: int = 0
    draft_core_counts: list[int] = field(default_factory=lambda: [0])
    verify: dict[int, LinearFit] = field(default_factory=dict)  # by core count
    draft: dict[int, LinearFit] = field(default_factory=dict)  # by core count
    accepted: float = 0.0
    offered: float = 0.0
    accepted_at: int = 0  # the decision of the last acceptance observed
    decisions: int = 0
    last_tried: dict = field(default_factory=dict)  # Option -> decision index
    ran_at: dict = field(default_factory=dict)  # Option -> (verify_bs, draft_bs) of its last step
    held_at: int = -1  # the decision that last kept the current option to measure it at a new batch
    holds: int = 0  # steps kept so (/server_info)
    current: Option | None = None  # chosen on rates (exploration aside)
    explore: Option | None = None
    explore_left: int = 0
    explore_interval: int = EXPLORE_FIRST
    next_exploration: int = EXPLORE_FIRST  # a decision index

    # ------------------------------------------------------------ measure

    def observe_verify(self, cores: int, tokens: int, seconds: float, requests: int) -> None:
        self.verify.setdefault(cores, LinearFit()).add(tokens, seconds, requests, self.decisions)

    def observe_draft(self, cores: int, requests: int, forwards: int, seconds: float) -> None:
        if forwards > 0:
            self.draft.setdefault(cores, LinearFit()).add(requests, seconds / forwards, now=self.decisions)

    def observe_acceptance(self, accepted_drafts: list[int], offered: list[int]) -> None:
        """Per verified request: drafts accepted, drafts it had. A chain stops
        at its first rejection, so each request contributes its accepted
        drafts plus, if it stopped early, one rejection."""
        f = DECAY ** (self.decisions - self.accepted_at)
        self.accepted_at = self.decisions
        self.accepted = f * self.accepted + sum(accepted_drafts)
        self.offered = f * self.offered + sum(a + (a < n) for a, n in zip(accepted_drafts, offered))

    @property
    def alpha(self) -> float:
        # Optimistic before any verify: drafting gets tried.
        return self.accepted / self.offered if self.offered else 1.0

    # ------------------------------------------------------------- decide

    def cores(self, option: Option) -> tuple[int, int]:
        """(verify cores, background draft cores) of a step run as ``option``."""
        return stage_cores(self.total_cores, option.mode, option.draft_cores)

    def rate(self, option: Option, verify_bs: int, draft_bs: int) -> float:
        """Expected committed tokens per second of a step run as ``option``
        (infinite while a cost it needs is unmeasured). ``verify_bs`` and
        ``draft_bs`` are the PSD halves; other modes verify both."""
        batch = verify_bs + draft_bs
        fits = self._fits(option)
        if any(fit is None for fit in fits):
            return float("inf")
        t_v = fits[0]
        if option.mode is StepMode.PLAIN:
            return batch / max(t_v(batch, batch), 1e-9)
        t_d, k = fits[1], option.k
        alpha = min(self.alpha, 1.0)
        if option.mode is StepMode.PSD:
            step = max(k * t_d(draft_bs), t_v(verify_bs * (k + 1), verify_bs))
            return verify_bs * accept_length(alpha, k) / max(step, 1e-9)
        verify = t_v(batch * (k + 1), batch)
        if option.mode is StepMode.DRAFT_AHEAD:
            hold = alpha ** (k + 1)
            miss = (1 - hold**batch) * k * fits[2](max(1.0, batch * (1 - hold)))
            step = max((k + 1) * t_d(batch), verify) + miss
        else:
            step = k * t_d(batch) + verify
        return batch * accept_length(alpha, k) / max(step, 1e-9)

    def choose(self, verify_bs: int, draft_bs: int, modes: set[StepMode]) -> Option:
        """The option for this step among ``modes`` (PSD only where both
        halves hold requests): the current one unless another's expected
        rate is clearly better, or, for EXPLORE_STEPS steps now and then
        (see the module's docstring), the one measured least recently."""
        self.decisions += 1
        batch = (verify_bs, draft_bs)
        allowed = options(self.k_max, modes, self.draft_core_counts)
        if self.explore_left and self.explore in allowed:
            self.explore_left -= 1
            choice = self.explore
        elif self.decisions >= self.next_exploration and len(allowed) > 1:
            others = [o for o in allowed if o != self.current]
            choice = self.explore = min(others, key=lambda o: (self.measured_at(o), self.last_tried.get(o, -1)))
            self.explore_left = EXPLORE_STEPS - 1
            self.next_exploration = self.decisions + self.explore_interval
            self.explore_interval = min(2 * self.explore_interval, EXPLORE_MAX)
        else:
            rates = {o: self.rate(o, verify_bs, draft_bs) for o in allowed}
            best = max(rates, key=rates.get)
            margin = 1 if best.mode is StepMode.SEQUENTIAL else 1 + HYSTERESIS
            if self.current not in rates or rates[best] > margin * rates[self.current]:
                if self._measure_current_first(batch, rates):
                    self.held_at = self.decisions
                    self.holds += 1
                    best = self.current
                elif self.current is not None and best != self.current:
                    self.explore_interval = min(self.explore_interval, EXPLORE_AFTER_CHANGE)
                    self.next_exploration = min(self.next_exploration, self.decisions + EXPLORE_AFTER_CHANGE)
                self.current = best
            choice = self.current
        self.last_tried[choice] = self.decisions
        self.ran_at[choice] = batch
        return choice

    def _measure_current_first(self, batch: tuple[int, int], rates: dict) -> bool:
        """Whether to run the current option once more before leaving it: it
        is allowed, last ran at another batch (its rate here is the fits'
        extrapolation), and was not just kept for that (a batch that moves
        every step delays a switch by one step at most)."""
        ran = self.ran_at.get(self.current)
        return self.current in rates and ran is not None and ran != batch and self.held_at != self.decisions - 1

    def _fits(self, option: Option) -> list[LinearFit | None]:
        """The stage fits ``option``'s rate rests on (None: not measured
        yet): the verify's, and where it drafts the draft's, and for
        draft-ahead the draft's on every core (a missed guess drafts alone)."""
        v_cores, d_cores = self.cores(option)
        fits = [self.verify.get(v_cores)]
        if option.k:
            fits.append(self.draft.get(d_cores))
        if option.mode is StepMode.DRAFT_AHEAD:
            fits.append(self.draft.get(self.total_cores))
        return fits

    def measured_at(self, option: Option) -> int:
        """The decision of the oldest measurement ``option``'s rate rests on
        (its fits, acceptance where it drafts); -1 while one is missing.
        Options share fits (one per core count), so a stale one is refreshed
        by whichever of them runs next."""
        fits = self._fits(option)
        if any(fit is None for fit in fits):
            return -1
        return min([fit.now for fit in fits] + ([self.accepted_at] if option.k and self.offered else []))

    def summary(self) -> dict:
        return {
            "alpha": self.alpha,
            "choice": None if self.current is None else dataclasses.asdict(self.current),
            # Steps that kept the current option to measure it at a new batch before leaving it.
            "held_for_a_new_batch": self.holds,
            # Per core count (0: not managed): one request's verify of one token, one request's draft forward.
            "t_verify_1_token_s": {c: fit(1, 1) for c, fit in self.verify.items()},
            "t_draft_1_request_s": {c: fit(1) for c, fit in self.draft.items()},
        }
