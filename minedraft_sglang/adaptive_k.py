"""Online choice of k, the drafts per request, from the costs measured so far.

Speculation pays only while drafting k tokens and verifying k + 1 per request
costs less per committed token than a plain decode step. On a memory-bound
target, plain batching is cheap, so at high concurrency it often does not pay;
the field's adaptive schemes then stop drafting. The planner picks, before
each step, the k in 0..k_max with the highest expected tokens per second;
k = 0 is a plain decode step of the whole batch (each request verifies only
its last token: no drafts, no drafting).

Measured online (pure Python, no SGLang, no torch):

    t_v(n)   one target verify of n tokens (n = requests x (k + 1)): a + c*n
    t_d(b)   one drafter forward over b requests (one token each): a + c*b
    alpha    per-token acceptance, from accepted / offered drafts

Rates compared, for B running requests split into halves b_v (verified) and
b_d (drafted) when PSD overlaps them:

    psd(k)        b_v * L(k) / max(k*t_d(b_d), t_v(b_v*(k+1)))
    sequential(k) B * L(k) / (k*t_d(B) + t_v(B*(k+1)))
    ahead(k)      B * L(k) / (max((k+1)*t_d(B), t_v(B*(k+1))) + (1 - alpha^(k+1))*k*t_d(B))
    plain         B / t_v(B)                       (k = 0)

``ahead`` is draft-ahead (PEARL, one half empty in ``auto`` mode): the next
drafts are made during the verify and are ready when all k drafts and the
guessed bonus token were right (probability alpha^(k+1)); otherwise the next
step drafts first.

with L(k) = (1 - alpha^(k+1)) / (1 - alpha), the expected tokens per verify.
Every ``EXPLORE_EVERY``-th decision starts ``EXPLORE_STEPS`` steps at the k
tried least recently, so the fits cover the widths they are asked about (a fit
from one width cannot tell the fixed cost of a forward from the cost per
token) and acceptance stays measured while plain steps win. Several steps,
because in PSD a k takes a step to reach the verify (the half verified next
was drafted now), and a lone step would measure only the switch. Otherwise
the current k is kept unless another is ``HYSTERESIS`` better: every switch
into drafting costs a step whose drafts are not ready.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EXPLORE_EVERY = 64
EXPLORE_STEPS = 4
HYSTERESIS = 0.05
# Old measurements fade (the batch, the prompts and the machine drift):
# the fits weigh the last ~1/(1 - DECAY) observations.
DECAY = 0.98


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
    """y = a + c*x by exponentially weighted least squares (c >= 0)."""

    w: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0

    def add(self, x: float, y: float) -> None:
        self.w = DECAY * self.w + 1
        self.sx = DECAY * self.sx + x
        self.sy = DECAY * self.sy + y
        self.sxx = DECAY * self.sxx + x * x
        self.sxy = DECAY * self.sxy + x * y

    @property
    def empty(self) -> bool:
        return self.w == 0

    def __call__(self, x: float) -> float:
        mx, my = self.sx / self.w, self.sy / self.w
        var = self.sxx / self.w - mx * mx
        # One x seen so far (or a negative slope from noise): a constant.
        c = max(0.0, (self.sxy / self.w - mx * my) / var) if var > 1e-9 * max(1.0, mx * mx) else 0.0
        return max(0.0, my + c * (x - mx))


@dataclass
class KPlanner:
    k_max: int
    verify: LinearFit = field(default_factory=LinearFit)
    draft: LinearFit = field(default_factory=LinearFit)
    accepted: float = 0.0
    offered: float = 0.0
    decisions: int = 0
    last_tried: dict = field(default_factory=dict)  # k -> decision index
    current: int = -1  # the k chosen on rates (exploration aside); -1: none yet
    explore_k: int = 0
    explore_left: int = 0

    # ------------------------------------------------------------ measure

    def observe_verify(self, tokens: int, seconds: float) -> None:
        self.verify.add(tokens, seconds)

    def observe_draft(self, requests: int, forwards: int, seconds: float) -> None:
        if forwards > 0:
            self.draft.add(requests, seconds / forwards)

    def observe_acceptance(self, accepted_drafts: list[int], offered: list[int]) -> None:
        """Per verified request: drafts accepted, drafts it had. A chain stops
        at its first rejection, so each request contributes its accepted
        drafts plus, if it stopped early, one rejection."""
        self.accepted = DECAY * self.accepted + sum(accepted_drafts)
        self.offered = DECAY * self.offered + sum(a + (a < n) for a, n in zip(accepted_drafts, offered))

    @property
    def alpha(self) -> float:
        # Optimistic before any verify: drafting gets tried.
        return self.accepted / self.offered if self.offered else 1.0

    # ------------------------------------------------------------- decide

    def rate(self, k: int, verify_bs: int, draft_bs: int, ahead: bool = False) -> float:
        """Expected committed tokens per second of a step with k drafts.
        ``draft_bs`` > 0: PSD (the other half is drafted meanwhile); 0:
        sequential, or draft-ahead if ``ahead``. k = 0 is a plain decode of
        all requests."""
        batch = verify_bs + draft_bs
        if k == 0:
            return batch / max(self.verify(batch), 1e-9)
        alpha = min(self.alpha, 1.0)
        tokens = verify_bs * accept_length(alpha, k)
        verify = self.verify(verify_bs * (k + 1))
        if draft_bs:
            step = max(k * self.draft(draft_bs), verify)
        elif ahead:
            draft = self.draft(verify_bs)
            step = max((k + 1) * draft, verify) + (1 - alpha ** (k + 1)) * k * draft
        else:
            step = k * self.draft(verify_bs) + verify
        return tokens / max(step, 1e-9)

    def choose(self, verify_bs: int, draft_bs: int, ahead: bool = False) -> int:
        """k for this step: the current one unless another's expected rate
        is clearly better, or, for a few steps every EXPLORE_EVERY
        decisions, the k tried least recently."""
        self.decisions += 1
        if self.verify.empty or self.draft.empty:
            k = self.k_max
        elif self.explore_left:
            self.explore_left -= 1
            k = self.explore_k
        elif self.decisions % EXPLORE_EVERY == 0:
            others = [j for j in range(self.k_max + 1) if j != self.current]
            k = self.explore_k = min(others, key=lambda j: self.last_tried.get(j, -1))
            self.explore_left = EXPLORE_STEPS - 1
        else:
            rates = {j: self.rate(j, verify_bs, draft_bs, ahead) for j in range(self.k_max + 1)}
            best = max(rates, key=rates.get)
            if self.current < 0 or rates[best] > (1 + HYSTERESIS) * rates[self.current]:
                self.current = best
            k = self.current
        self.last_tried[k] = self.decisions
        return k

    def summary(self) -> dict:
        return {
            "alpha": self.alpha,
            "t_verify_1_token_s": None if self.verify.empty else self.verify(1),
            "t_draft_1_request_s": None if self.draft.empty else self.draft(1),
        }
