"""The implementations fastperturb is compared with, reimplemented for benchmarking.

These are written from the descriptions in docs/design.md §1 (what people run
today) plus a careful pure-PyTorch ``torch._foreach_*`` version of each cycle,
the honest baseline a good engineer would write without custom kernels. They
live here, beside the benchmark runner, not in the installed package. Every
peer computes the same perturbation as the matching fastperturb preset
(tests/test_bench.py checks it), so only the cost differs.

Step conventions: peers written in the style of the common SAM wrapper expect
the clean gradient g_0 to be in ``.grad`` before ``step(closure)`` and call the
closure once per perturbed pass (``closure_calls_self = False``); the benchmark
calls the closure for g_0 itself for those.

Peers:

* :class:`ForeachSAM` (also ASAM with ``adaptive_eta``), :class:`ForeachAWP`,
  :class:`ForeachAPD`: preallocated buffers, ``torch._foreach_*`` ops only.
* :class:`LoopSAM`: the common SAM wrapper: Python loop over parameters,
  ``old_p = p.clone()`` every step, several kernels per tensor; restores by
  swapping ``p.data`` back to the clone (the cheap way).
* :class:`ProxyAWP`: the official AWP approach: a whole proxy copy of the model
  plus a proxy optimizer, the full ``state_dict`` copied into the proxy every
  step, a dict of per-layer diffs; restore by subtracting the diff (so not
  bit-exact).
* :class:`DeepCopyAPD`: the multi-step variants: deep-copies the parameters,
  keeps a gradient clone per pass and a new delta per step.
* :func:`pytorch_optimizer_sam`: the ``pytorch-optimizer`` package's SAM, if
  installed (otherwise the benchmark reports it as skipped).
"""

from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from fastperturb.optim.buffers import buffers_like

TINY = 1e-12


def _global_norm(ts: Sequence[Tensor]) -> Tensor:
    if not ts:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(ts)))


class NoOpOptimizer(torch.optim.Optimizer):
    """A base optimizer whose step does nothing: the step suite times the perturbation only."""

    def __init__(self, params, lr: float = 0.0, **_ignored):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        return None


class _ForeachBase:
    closure_calls_self = False

    def __init__(self, params: Sequence[Tensor], base: Optional[torch.optim.Optimizer] = None):
        self.params = list(params)
        self.base = base
        # views of one block per dtype and device, as fastperturb lays out its own buffers
        self.backups = buffers_like(self.params)

    def _grads(self) -> list[Tensor]:
        return [p.grad for p in self.params]

    @torch.no_grad()
    def step(self, closure: Callable[[], object]):
        self.cycle(closure)
        if self.base is not None:
            self.base.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def _pass_then_restore(self, closure: Optional[Callable[[], object]]) -> None:
        """The pass at the perturbed point, then the weights back from the backups."""
        try:
            if closure is not None:
                with torch.enable_grad():
                    closure()
        finally:
            torch._foreach_copy_(self.params, self.backups)


class ForeachSAM(_ForeachBase):
    """SAM (or ASAM with ``adaptive_eta``) with ``torch._foreach_*`` ops, g_0 in ``.grad``.

    8 passes for SAM (norm 1, copy to backup 2, add 3, restore copy 2) vs the
    fused 7. ASAM needs temporaries for T*g and T^2*g.
    """

    def __init__(self, params, rho: float, adaptive_eta: Optional[float] = None, base=None):
        super().__init__(params, base)
        self.rho = rho
        self.eta = adaptive_eta
        # ASAM's temporaries T and T*g, allocated once (out-of-place foreach ops would allocate them every step)
        self._t = buffers_like(self.params) if adaptive_eta is not None else []
        self._tg = buffers_like(self.params) if adaptive_eta is not None else []

    @torch.no_grad()
    def cycle(self, closure: Optional[Callable[[], object]] = None) -> None:
        grads, ps = self._grads(), self.params
        torch._foreach_copy_(self.backups, ps)
        if self.eta is None:
            scale = self.rho / max(float(_global_norm(grads)), TINY)
            torch._foreach_add_(ps, grads, alpha=scale)
        else:
            t, tg = self._t, self._tg
            torch._foreach_copy_(t, ps)
            torch._foreach_abs_(t)
            torch._foreach_add_(t, self.eta)  # T = |w| + eta
            torch._foreach_copy_(tg, grads)
            torch._foreach_mul_(tg, t)
            scale = self.rho / max(float(_global_norm(tg)), TINY)
            torch._foreach_mul_(tg, t)  # T^2 g
            torch._foreach_add_(ps, tg, alpha=scale)
        self._pass_then_restore(closure)


class ForeachAWP(_ForeachBase):
    """AWP (relative, per layer): delta_l = gamma ||w_l|| g_l / ||g_l||.

    The clean gradient is scratch (AWP's descent gradient is the perturbed pass's),
    so it is scaled in place: norms 2, copy 2, mul_ 2, add_ 3, restore 2 = 11 passes.
    """

    def __init__(self, params, gamma: float, base=None):
        super().__init__(params, base)
        self.gamma = gamma

    @torch.no_grad()
    def cycle(self, closure: Optional[Callable[[], object]] = None) -> None:
        grads, ps = self._grads(), self.params
        wn = torch.stack(torch._foreach_norm(ps))
        gn = torch.stack(torch._foreach_norm(grads))
        coef = torch.where(gn > 0, self.gamma * wn / gn.clamp_min(TINY), torch.zeros_like(gn)).tolist()
        torch._foreach_copy_(self.backups, ps)
        torch._foreach_mul_(grads, coef)
        torch._foreach_add_(ps, grads)
        self._pass_then_restore(closure)


class ForeachAPD(_ForeachBase):
    """APD-K (global L2 ball of radius eps, step eta, clean term included) with foreach ops.

    Buffers: backup, delta and the gradient accumulator (3 parameter-sized).
    """

    def __init__(self, params, eps: float, steps: int, eta: float, include_clean: bool = True, base=None):
        super().__init__(params, base)
        self.eps, self.steps, self.eta, self.include_clean = eps, steps, eta, include_clean
        self.delta = [torch.empty_like(p) for p in self.params]
        self.accum = [torch.empty_like(p) for p in self.params]

    @torch.no_grad()
    def cycle(self, closure: Optional[Callable[[], object]] = None) -> None:
        ps, k_total = self.params, self.steps
        c = 1.0 / (k_total + 1) if self.include_clean else 1.0 / k_total
        grads = self._grads()
        torch._foreach_copy_(self.backups, ps)
        torch._foreach_zero_(self.delta)
        torch._foreach_zero_(self.accum)
        if self.include_clean:
            torch._foreach_add_(self.accum, grads, alpha=c)
        try:
            for k in range(1, k_total + 1):
                gn = float(_global_norm(grads))
                if gn > 0:
                    torch._foreach_add_(self.delta, grads, alpha=self.eta / gn)
                dn = float(_global_norm(self.delta))
                if dn > self.eps:
                    torch._foreach_mul_(self.delta, self.eps / dn)
                torch._foreach_copy_(ps, self.backups)
                torch._foreach_add_(ps, self.delta)
                if closure is not None:
                    with torch.enable_grad():
                        closure()
                    grads = self._grads()
                if k < k_total:
                    torch._foreach_add_(self.accum, grads, alpha=c)
            torch._foreach_mul_(grads, c)
            torch._foreach_add_(grads, self.accum)
        finally:
            torch._foreach_copy_(ps, self.backups)


class LoopSAM:
    """The common SAM wrapper (also ASAM: T = |w| + eta): per-parameter loop, clones ``old_p`` every step."""

    closure_calls_self = False

    def __init__(self, params, base_cls, rho: float = 0.05, adaptive_eta: Optional[float] = None, **kwargs):
        self.params = [p for p in params]
        self.base = base_cls(self.params, **kwargs)
        self.rho, self.eta = rho, adaptive_eta
        self.state: dict = {}

    @torch.no_grad()
    def first_step(self) -> None:
        norms = []
        for p in self.params:
            if p.grad is None:
                continue
            t = (p.abs() + self.eta) if self.eta is not None else 1.0
            norms.append((t * p.grad).norm(p=2))
        grad_norm = torch.norm(torch.stack(norms), p=2)
        scale = self.rho / (grad_norm + TINY)
        for p in self.params:
            if p.grad is None:
                continue
            self.state.setdefault(p, {})["old_p"] = p.data.clone()
            t2 = (p.abs() + self.eta) ** 2 if self.eta is not None else 1.0
            e_w = t2 * p.grad * scale.to(p)
            p.add_(e_w)

    @torch.no_grad()
    def second_step(self) -> None:
        for p in self.params:
            st = self.state.get(p)
            if st and "old_p" in st:
                p.data = st.pop("old_p")
        self.base.step()

    def step(self, closure: Callable[[], object]):
        self.first_step()
        self.zero_grad()  # the wrapper's first_step(zero_grad=True), as its step(closure) calls it
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)


class ParamModule(nn.Module):
    """Wraps existing parameters as a module (no copy), so model-based peers see a model."""

    def __init__(self, params: Sequence[nn.Parameter]):
        super().__init__()
        self.ps = nn.ParameterList(params)


class ProxyAWP:
    """The proxy-model AWP: proxy copy + proxy optimizer, full state_dict copy and a diff dict per step.

    ``step(closure, proxy_closure)``: ``proxy_closure(proxy)`` computes the loss on
    the proxy and calls backward (the adversarial ascent is done by the proxy
    optimizer with ``maximize=True``); ``closure()`` computes the loss at the
    perturbed model. Perturbs weights with dim > 1. The proxy learning rate
    cancels out of the normalised diff.
    """

    closure_calls_self = True

    def __init__(self, model: nn.Module, base: torch.optim.Optimizer, gamma: float = 5e-3, proxy_lr: float = 0.01):
        self.model = model
        self.base = base
        self.gamma = gamma
        self.proxy = copy.deepcopy(model)
        self.proxy_opt = torch.optim.SGD(self.proxy.parameters(), lr=proxy_lr, maximize=True)

    def calc_awp(self, proxy_closure: Callable[[nn.Module], object]) -> dict[str, Tensor]:
        self.proxy.load_state_dict(self.model.state_dict())
        self.proxy.train()
        self.proxy_opt.zero_grad()
        with torch.enable_grad():
            proxy_closure(self.proxy)
        self.proxy_opt.step()
        diff = {}
        model_sd, proxy_sd = self.model.state_dict(), self.proxy.state_dict()
        for name, w in model_sd.items():
            if w.dim() <= 1 or not w.is_floating_point():
                continue
            d = proxy_sd[name] - w
            diff[name] = w.norm() / (d.norm() + 1e-20) * d
        return diff

    @torch.no_grad()
    def _add(self, diff: dict[str, Tensor], coeff: float) -> None:
        for name, p in self.model.named_parameters():
            if name in diff:
                p.add_(coeff * self.gamma * diff[name])

    def step(self, closure: Callable[[], object], proxy_closure: Callable[[nn.Module], object]):
        diff = self.calc_awp(proxy_closure)
        self._add(diff, 1.0)
        try:
            with torch.enable_grad():
                loss = closure()
        finally:
            self._add(diff, -1.0)
        self.base.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)


class DeepCopyAPD:
    """Multi-step APD as commonly written: deep copy of the weights, a gradient clone per pass, a delta per step."""

    closure_calls_self = False

    def __init__(self, params, base_cls, eps: float, steps: int, eta: float, include_clean: bool = True, **kwargs):
        self.params = list(params)
        self.base = base_cls(self.params, **kwargs)
        self.eps, self.steps, self.eta, self.include_clean = eps, steps, eta, include_clean
        self.history: list = []

    def step(self, closure: Callable[[], object]):
        k_total = self.steps
        c = 1.0 / (k_total + 1) if self.include_clean else 1.0 / k_total
        with torch.no_grad():
            w0 = copy.deepcopy([p.detach() for p in self.params])
            grad_clones = [[p.grad.clone() for p in self.params]] if self.include_clean else []
            deltas = [[torch.zeros_like(p) for p in self.params]]
        loss = None
        try:
            for _ in range(1, k_total + 1):
                with torch.no_grad():
                    gn = torch.norm(torch.stack([p.grad.norm() for p in self.params]))
                    new = [d + self.eta * p.grad / gn if gn > 0 else d.clone() for d, p in zip(deltas[-1], self.params)]
                    dn = torch.norm(torch.stack([d.norm() for d in new]))
                    if dn > self.eps:
                        new = [d * (self.eps / dn) for d in new]
                    deltas.append(new)
                    for p, w, d in zip(self.params, w0, new):
                        p.copy_(w + d)
                with torch.enable_grad():
                    loss = closure()
                with torch.no_grad():
                    grad_clones.append([p.grad.clone() for p in self.params])
        finally:
            with torch.no_grad():
                for p, w in zip(self.params, w0):
                    p.copy_(w)
        with torch.no_grad():
            for i, p in enumerate(self.params):
                total = grad_clones[0][i] * c
                for gs in grad_clones[1:]:
                    total = total + gs[i] * c
                p.grad.copy_(total)
        self.base.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)


def pytorch_optimizer_available() -> Optional[str]:
    """None if pytorch-optimizer's SAM can be used, else why not."""
    try:
        import pytorch_optimizer

        pytorch_optimizer.SAM  # noqa: B018  (the class the benchmark uses)
    except Exception as e:
        return f"not installed ({type(e).__name__}: {e}); pip install --no-deps pytorch-optimizer"
    return None


def pytorch_optimizer_sam(params, base_cls, rho: float, foreach: Optional[bool] = None, **kwargs):
    """pytorch-optimizer's SAM (expects g_0 in .grad before ``step(closure)``)."""
    from pytorch_optimizer import SAM

    opt = SAM(params, base_cls, rho=rho, foreach=foreach, **kwargs)
    opt.closure_calls_self = False
    return opt


# ----------------------------------------------------------------------------- the SAM family (issue 11)

#: The hyper-parameters every implementation of the ``family`` suite uses: pytorch-optimizer 4.1.0's defaults
#: (GSAM's alpha and WSAM's gamma too), rho kept constant for GSAM (its ProportionScheduler maps a constant LR).
FAMILY = {
    "GSAM": {"rho": 0.05, "alpha": 0.4},
    "WSAM": {"rho": 0.05, "gamma": 0.9},
    "LookSAM": {"rho": 0.1, "k": 10, "alpha": 0.7},
    "FriendlySAM": {"rho": 0.05, "sigma": 1.0, "lmbda": 0.9},
}
FAMILY_LR = 0.01  # the base optimizer's lr: WSAM's decoupled update and GSAM's rho schedule read it


def pytorch_optimizer_family_available(name: str) -> Optional[str]:
    """None if pytorch-optimizer's class ``name`` (and GSAM's ProportionScheduler) can be used, else why not."""
    try:
        import pytorch_optimizer

        getattr(pytorch_optimizer, name)
        if name == "GSAM":
            pytorch_optimizer.ProportionScheduler  # noqa: B018
    except Exception as e:
        return f"not available ({type(e).__name__}: {e}); pip install --no-deps pytorch-optimizer"
    return None


def pytorch_optimizer_family(
    name: str,
    params: Sequence[Tensor],
    base_cls,
    closure: Callable[[], object],
    foreach: Optional[bool] = None,
    manual: bool = False,
):
    """pytorch-optimizer's ``name`` on its documented loop: ``(step, optimizer)``, one call of ``step`` = one step.

    ``closure`` writes the gradients (as a forward/backward would). The loops, as pytorch-optimizer documents them:

    * GSAM: ``optimizer.step(closure)`` makes both passes itself (its closure is what ``set_closure`` builds:
      zero the gradients, forward, backward, return (outputs, loss)); then ``lr_scheduler.step()`` and
      ``optimizer.update_rho_t()``. It takes a base optimizer *instance*, the model and a ProportionScheduler.
    * WSAM: ``optimizer.step(closure)`` makes both passes itself; it takes the model.
    * LookSAM, FriendlySAM: ``closure(); optimizer.step(closure)`` (2 passes every step, LookSAM too).
    * LookSAM with ``manual=True``: the loop that gets 1 + 1/k passes: ``closure()``, then on a refresh step
      ``first_step(zero_grad=True); closure(); second_step()`` and on the others ``second_step()`` alone.
    """
    import pytorch_optimizer as po

    hp = FAMILY[name]
    params = list(params)
    model = ParamModule(params)
    if name == "GSAM":
        base = base_cls(params, lr=FAMILY_LR)
        sched = torch.optim.lr_scheduler.LambdaLR(base, lambda t: 1.0)
        rho = po.ProportionScheduler(sched, max_lr=FAMILY_LR, min_lr=0.0, max_value=hp["rho"], min_value=hp["rho"])
        opt = po.GSAM(params, base, model, rho, alpha=hp["alpha"], foreach=foreach)

        def get_grad():
            base.zero_grad()
            return None, closure()

        def step():
            opt.step(get_grad)
            sched.step()
            opt.update_rho_t()

        return step, opt
    if name == "WSAM":
        opt = po.WSAM(model, params, base_cls, rho=hp["rho"], gamma=hp["gamma"], foreach=foreach, lr=FAMILY_LR)
        return (lambda: opt.step(closure)), opt
    cls = getattr(po, name)
    opt = cls(params, base_cls, foreach=foreach, lr=FAMILY_LR, **hp)

    def documented():
        closure()
        opt.step(closure)

    if not manual:
        return documented, opt
    if name != "LookSAM":
        raise ValueError(f"manual=True is LookSAM's loop, not {name}'s")

    def manual_step():
        closure()
        if opt.get_step() % opt.k == 0:
            opt.first_step(zero_grad=True)
            closure()
        opt.second_step()

    return manual_step, opt
