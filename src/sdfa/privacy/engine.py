"""``PrivacyEngine``: make a model's training (epsilon, delta)-differentially private.

Modelled on Opacus (``PrivacyEngine.make_private`` wraps the model, optimizer and data loader
the user already has) and built on it: Poisson sampling (``DPDataLoader``), noise and averaging
(``DPOptimizer``), accounting (Opacus's RDP / PRV / GDP accountants). ``dp-sgd`` is Opacus
itself; ``dp-dfa`` and ``dp-noisy-projection`` bound DFA's per-example updates with
:mod:`sdfa.privacy.mechanism` instead of per-example gradients.
"""

from __future__ import annotations

import functools
import math

import opacus
import torch
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader

from ..convert import rules_of
from .mechanism import SECOND_BACKWARD, DPFeedbackOptimizer, FeedbackMechanism
from .probe import check_examples_independent
from .randomness import secret_generator, secure_generator

ACCOUNTANTS = ("rdp", "prv", "gdp")
# RDP orders searched for the tightest epsilon. Opacus's defaults stop at 63, the optimum (about
# which Opacus warns) for small epsilons; every order gives a valid bound, so more orders only
# tighten it. (Orders below 1.1 would help only tiny noise, at a high cost: not included.)
RDP_ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS) + tuple(range(64, 256, 8)) + (
    256, 320, 384, 512, 768, 1024, 2048, 4096)
GDP_REFUSED = (
    "accountant 'gdp' can underestimate the privacy spent (Opacus warns so; Gopi et al. 2021, "
    "arXiv 2106.02848), so it cannot enforce a target epsilon: use 'rdp' or 'prv', or give "
    "noise_multiplier without a target to only report gdp's estimate"
)
# Each method's options and their defaults (None: required, or "no clipping" for the norms).
METHODS: dict[str, dict[str, object]] = {
    "dp-sgd": {"max_grad_norm": None},
    "dp-dfa": {"max_error_norm": 1.0, "max_input_norm": None, "max_activation_norm": None},
    "dp-noisy-projection": {
        "max_feedback_norm": 1.0,
        "target_quantile": 0.5,
        "clip_learning_rate": 0.2,
        "adaptive_share": 0.1,
        "max_input_norm": None,
        "max_activation_norm": None,
    },
}
_NORMS = ("max_grad_norm", "max_error_norm", "max_feedback_norm", "max_input_norm",
          "max_activation_norm")


class PrivacyBudgetExhausted(RuntimeError):
    """Raised by ``optimizer.step()`` instead of a step that would spend more than the target."""


class PrivacyEngine:
    """Tracks the privacy spent by one training run.

    >>> engine = PrivacyEngine()
    >>> model, optimizer, loader = engine.make_private_with_epsilon(
    ...     module=sdfa.convert(model, "dfa"), optimizer=optimizer, data_loader=loader,
    ...     method="dp-dfa", target_epsilon=2.0, target_delta=1e-5, epochs=20,
    ...     max_input_norm=4.0)
    >>> ...  # train as usual; engine.get_epsilon(1e-5) after each epoch
    """

    def __init__(self, accountant: str = "rdp", secure_mode: bool = False):
        """``secure_mode``: Opacus's (torchcsprng for all draws, and Gaussian sampling hardened
        against floating-point attacks). Otherwise the noise and the sampling come from secret
        generators (:mod:`sdfa.privacy.randomness`), unless ``make_private`` is given one."""
        if accountant not in ACCOUNTANTS:
            raise ValueError(
                f"unknown accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}"
            )
        self.secure_mode = secure_mode
        self._secure_rng = secure_generator() if secure_mode else None
        self.accountant = create_accountant(accountant)
        self.noise_source: str | None = None  # "secret", "secure" or "seeded" (make_private)
        self.method: str | None = None
        self.noise_multiplier: float | None = None  # as accounted (see dp-noisy-projection)
        self.sample_rate: float | None = None
        self.mechanism: FeedbackMechanism | None = None
        self.target: tuple[float, float] | None = None
        self._safe_steps: int | None = None  # steps known to fit in the target budget

    # -- public API ----------------------------------------------------------------------------

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        method: str = "dp-dfa",
        poisson_sampling: bool = True,
        loss_reduction: str = "mean",
        noise_generator=None,
        target_epsilon: float | None = None,
        target_delta: float | None = None,
        input_shape: tuple[int, ...] | None = None,
        **options,
    ):
        """Return ``(module, optimizer, data_loader)`` that train with ``method`` privately.

        Args:
            module: for ``dp-sgd`` an ordinary (or "bp"-converted) model; for the DFA methods a
                model converted with ``sdfa.convert(model, "dfa")`` (hooks are added to it).
            noise_multiplier: z, the noise std in units of the per-example sensitivity.
            method: ``dp-sgd``, ``dp-dfa`` or ``dp-noisy-projection``; its options (``METHODS``):
                ``max_grad_norm`` (dp-sgd), ``max_error_norm`` (dp-dfa: clip of the output
                error), ``max_feedback_norm`` (dp-noisy-projection: initial clip of each layer's
                feedback), ``target_quantile``, ``clip_learning_rate``, ``adaptive_share``
                (its adaptive clipping), ``max_input_norm`` / ``max_activation_norm`` (per-
                example clip of the first layer's input / of hidden activations; not needed
                after bounded activations such as tanh).
            noise_generator: draw the noise from this generator (and the Poisson sampling from
                the data loader's own ``generator``, as Opacus does): reproducible, and private
                only if nobody knows their states. By default both come from secret
                generators created for this call (``noise_source`` says which applies).
            target_epsilon, target_delta: a budget; ``optimizer.step()`` raises
                :class:`PrivacyBudgetExhausted` instead of exceeding it.
            input_shape: the shape of one example's input, for the probe that refuses a model
                that mixes the examples of a batch (default: that of the data set's first item).
        """
        if self.method is not None:
            raise ValueError("this PrivacyEngine already tracks a model; create a new one")
        options = _check_options(method, options)
        _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum'; got {loss_reduction!r}")
        if (target_epsilon is None) != (target_delta is None):
            raise ValueError("give both target_epsilon and target_delta, or neither")
        if target_epsilon is not None:
            _check_budget(target_epsilon, target_delta)
            _check_accountant_enforces(self.accountant.mechanism())
        input_shape = _input_shape(data_loader) if input_shape is None else tuple(input_shape)
        check_examples_independent(module, input_shape)  # before any hook of ours is installed
        noise_rng, sample_rng = self._generators(module, data_loader, noise_generator)

        sample_rate = 1 / len(data_loader)
        if method == "dp-sgd":
            module, optimizer, data_loader = self._opacus(
                module, optimizer, data_loader, noise_multiplier, poisson_sampling,
                loss_reduction, noise_rng, options["max_grad_norm"],
            )
            if poisson_sampling:
                data_loader.batch_sampler.generator = sample_rng
        else:
            if poisson_sampling:
                data_loader = DPDataLoader.from_data_loader(data_loader, generator=sample_rng)
                expected = len(data_loader.dataset) * sample_rate
            else:
                expected = data_loader.batch_size
            self.mechanism = FeedbackMechanism(
                module,
                method,
                loss_reduction=loss_reduction,
                max_input_norm=options["max_input_norm"],
                max_activation_norm=options["max_activation_norm"],
                max_error_norm=options.get("max_error_norm"),
                max_feedback_norm=options.get("max_feedback_norm"),
                target_quantile=options.get("target_quantile", 0.5),
                clip_learning_rate=options.get("clip_learning_rate", 0.0),
                expected_batch_size=expected,
            )
            noise, self.mechanism.count_noise = _split_noise(
                noise_multiplier, options.get("adaptive_share", 0.0), len(self.mechanism.layers)
            )
            optimizer = DPFeedbackOptimizer(
                optimizer,
                mechanism=self.mechanism,
                noise_multiplier=noise,
                expected_batch_size=expected,
                loss_reduction=loss_reduction,
                generator=noise_rng,
                secure_mode=self.secure_mode,
            )
            optimizer.attach_step_hook(self._account)
        self.method = method
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        if target_epsilon is not None:
            self.target = (target_epsilon, target_delta)
            self._safe_steps = self._steps_within(target_epsilon, target_delta)
        return module, optimizer, data_loader

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        **kwargs,
    ):
        """Like :meth:`make_private`, with the noise that spends the budget in ``epochs``."""
        _check_budget(target_epsilon, target_delta)
        _check_accountant_enforces(self.accountant.mechanism())
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive integer; got {epochs!r}")
        steps = epochs * len(data_loader)
        noise = _calibrated_noise(target_epsilon, target_delta, 1 / len(data_loader), steps,
                                  self.accountant.mechanism())
        self._safe_steps = steps  # the noise is calibrated for them: no search needed
        return self.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=noise,
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            **kwargs,
        )

    def get_epsilon(self, delta: float) -> float:
        """The epsilon spent so far at ``delta`` (0 before the first step)."""
        _check_budget(1.0, delta)
        if not self.accountant.history:
            return 0.0
        if any(z == 0 for z, _, _ in self.accountant.history):
            return math.inf
        return _epsilon(self.accountant, delta)

    def state_dict(self) -> dict:
        """What a checkpoint must keep: the accountant's history and the adaptive thresholds."""
        state = {"accountant": self.accountant.state_dict()}
        if self.mechanism is not None:
            state["feedback_bounds"] = {
                name: layer.feedback_bound for name, layer in self.mechanism.layers.items()
            }
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue a run: call after ``make_private`` on the restored model and optimizer."""
        self.accountant.load_state_dict(state["accountant"])
        for name, bound in state.get("feedback_bounds", {}).items():
            self.mechanism.layers[name].feedback_bound = bound

    @property
    def steps_within_budget(self) -> int | None:
        """Steps that fit in the target budget (None without a target): the most that fit for
        ``make_private``, the planned ``epochs`` for ``make_private_with_epsilon``."""
        return self._safe_steps

    @property
    def steps(self) -> int:
        """Private steps taken (each one accounted)."""
        return sum(n for _, _, n in self.accountant.history)

    # -- internals -----------------------------------------------------------------------------

    def _generators(self, module, data_loader, noise_generator):
        """(noise generator, Poisson-sampling generator) and ``noise_source``."""
        if self.secure_mode:
            if noise_generator is not None:
                raise ValueError("secure_mode draws all noise from torchcsprng: do not pass "
                                 "noise_generator")
            self.noise_source = "secure"
            return self._secure_rng, self._secure_rng
        if noise_generator is not None:
            self.noise_source = "seeded"
            return noise_generator, data_loader.generator
        self.noise_source = "secret"
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        return secret_generator(device), secret_generator("cpu")  # the sampler draws on the CPU

    def _opacus(self, module, optimizer, data_loader, noise, poisson, reduction, generator,
                max_grad_norm):
        try:
            layer_rules = rules_of(module)
        except ValueError:
            layer_rules = {}
        others = sorted({r for r in layer_rules.values() if r != "bp"})
        if others:
            raise ValueError(
                f"method 'dp-sgd' trains with backprop, but this model is converted to "
                f"{', '.join(others)}: pass the unconverted model (or convert it with 'bp')"
            )
        engine = opacus.PrivacyEngine(accountant=self.accountant.mechanism(),
                                      secure_mode=self.secure_mode)
        engine.accountant = self.accountant
        # wrap_model=False: the model itself gets the per-sample hooks, so its state_dict keys
        # (checkpoints) stay those of the user's model.
        _, optimizer, data_loader = engine.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=noise,
            max_grad_norm=max_grad_norm,
            poisson_sampling=poisson,
            loss_reduction=reduction,
            noise_generator=None if self.secure_mode else generator,
            wrap_model=False,
        )
        account = optimizer.step_hook

        def hook(opt):
            if opt.accumulated_iterations > 1:  # Opacus would account it as a doubled rate
                raise ValueError(SECOND_BACKWARD)
            self._check_next_step(self.sample_rate)
            account(opt)

        optimizer.attach_step_hook(hook)
        return module, optimizer, data_loader

    def _account(self, optimizer) -> None:
        self._check_next_step(self.sample_rate)
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def _check_next_step(self, rate: float) -> None:
        if self.target is None:
            return
        within = rate == self.sample_rate and self.steps + 1 <= self._safe_steps
        if not within:  # beyond the known safe steps: evaluate this one step exactly
            within = self._epsilon_after([(self.noise_multiplier, rate, 1)]) <= self.target[0]
        if not within:
            epsilon, delta = self.target
            raise PrivacyBudgetExhausted(
                f"privacy budget reached: one more step would spend more than epsilon "
                f"{epsilon:g} at delta {delta:g} (spent so far: epsilon "
                f"{self.get_epsilon(delta):.3f} in {self.steps} steps); training stops here"
            )

    def _epsilon_after(self, extra: list[tuple[float, float, int]]) -> float:
        if self.noise_multiplier == 0:
            return math.inf
        accountant = create_accountant(self.accountant.mechanism())
        accountant.history = list(self.accountant.history) + extra
        return _epsilon(accountant, self.target[1])

    def _steps_within(self, epsilon: float, delta: float) -> int:
        """The most steps at the current noise and sample rate that spend at most epsilon."""
        if self._safe_steps is not None:  # set by make_private_with_epsilon
            return self._safe_steps
        if self._epsilon_after([(self.noise_multiplier, self.sample_rate, 1)]) > epsilon:
            raise ValueError(
                f"noise_multiplier {self.noise_multiplier:g} cannot meet the budget epsilon "
                f"{epsilon:g} at delta {delta:g} even for one step; add more noise"
            )
        low, high = 1, 2
        while self._epsilon_after([(self.noise_multiplier, self.sample_rate, high)]) <= epsilon:
            low, high = high, high * 2
            if high > 2**40:
                return high
        while high - low > 1:
            middle = (low + high) // 2
            if self._epsilon_after([(self.noise_multiplier, self.sample_rate, middle)]) <= epsilon:
                low = middle
            else:
                high = middle
        return low


@functools.lru_cache(maxsize=256)
def _calibrated_noise(epsilon: float, delta: float, sample_rate: float, steps: int,
                      accountant: str) -> float:
    """Opacus's noise multiplier for the budget (cached: its binary search takes seconds)."""
    orders = {"alphas": list(RDP_ORDERS)} if accountant == "rdp" else {}
    return get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                sample_rate=sample_rate, steps=steps, accountant=accountant,
                                **orders)


def _epsilon(accountant, delta: float) -> float:
    """The accountant's epsilon at ``delta``. RDP: Opacus's computation over
    :data:`RDP_ORDERS`, with each (noise, rate)'s RDP per step computed once (it is the costly
    part, and a run asks after every epoch)."""
    if accountant.mechanism() != "rdp":
        return float(accountant.get_epsilon(delta=delta))
    rdp = sum(steps * _rdp_per_step(z, q) for z, q, steps in accountant.history)
    return float(rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)[0])


@functools.lru_cache(maxsize=64)
def _rdp_per_step(noise_multiplier: float, sample_rate: float):
    return rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                    orders=RDP_ORDERS)


def _check_accountant_enforces(accountant: str) -> None:
    if accountant == "gdp":
        raise ValueError(GDP_REFUSED)


def _input_shape(data_loader) -> tuple[int, ...]:
    """The shape of one example's input: the first tensor of the data set's first item."""
    try:
        item = data_loader.dataset[0]
    except Exception as error:  # any data set: its own error type
        raise ValueError(f"cannot read the data set's first item to size the per-example "
                         f"probe ({error}): pass input_shape=") from error
    while isinstance(item, (tuple, list)) and item:
        item = item[0]
    if not hasattr(item, "shape"):
        raise ValueError("the data set's first item holds no tensor: pass input_shape=")
    return tuple(item.shape)


def _split_noise(noise_multiplier: float, share: float, layers: int) -> tuple[float, float]:
    """(z of the update noise, std of each count's noise) for adaptive clipping.

    dp-noisy-projection also releases one noisy count per layer and step (sensitivity 1/2
    each). Whitening the update (sensitivity S, noise z_u S) and the counts (noise sigma_b)
    gives one Gaussian mechanism of multiplier z with z^-2 = z_u^-2 + layers / (2 sigma_b)^2;
    ``share`` is the part of z^-2 given to the counts (Andrew et al. 2021).
    """
    if share == 0 or noise_multiplier == 0:
        return noise_multiplier, 0.0
    return (
        noise_multiplier / math.sqrt(1 - share),
        noise_multiplier * math.sqrt(layers / (4 * share)),
    )


def _check_options(method: str, options: dict) -> dict:
    if method not in METHODS:
        raise ValueError(f"unknown privacy method {method!r}; choose one of {', '.join(METHODS)}")
    unknown = sorted(set(options) - set(METHODS[method]))
    if unknown:
        raise ValueError(
            f"method {method!r} does not take option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(METHODS[method])}"
        )
    merged = {**METHODS[method], **options}
    if method == "dp-sgd" and merged["max_grad_norm"] is None:
        raise ValueError("method 'dp-sgd' needs max_grad_norm (the per-example gradient clip)")
    for name in _NORMS:
        if merged.get(name) is not None:
            _check_positive(name, merged[name])
    if method == "dp-noisy-projection":
        if not 0 < merged["target_quantile"] < 1:
            raise ValueError(f"target_quantile must be in (0, 1); got {merged['target_quantile']}")
        if not 0 <= merged["adaptive_share"] < 1:
            raise ValueError(f"adaptive_share must be in [0, 1); got {merged['adaptive_share']}")
        _check_positive("clip_learning_rate", merged["clip_learning_rate"], allow_zero=True)
    return merged


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a number {bound}; got {value!r}")


def _check_budget(epsilon, delta) -> None:
    _check_positive("epsilon", epsilon)
    if not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1); got {delta!r}")
