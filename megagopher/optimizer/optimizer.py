"""The optimizer step of a training iteration: global-norm clipping then AdamW.

The trainer talks to it through a small interface, whatever the precision or sharding behind it:
    scale_loss(loss)   the loss to backpropagate (a loss scaler multiplies here)
    step()             -> (updated: bool, grad_norm: float); computes the global gradient norm
                       (invariant 4), clips, and updates; returns updated=False for a skipped step
    zero_grad(), set_lr(lr), loss_scale (None unless fp16), state_dict(), load_state_dict()
Weight decay is not applied to biases and norm weights (every 1-D parameter), as in Megatron-LM.
"""
import torch

from megagopher.optimizer.clip import clip_by_norm, counts_once, global_norm


def _params(model_chunks):
    return [p for m in model_chunks for p in m.parameters() if p.requires_grad]


def param_groups(params, weight_decay):
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Optimizer:
    """fp32 AdamW over the model's own parameters."""

    loss_scale = None

    def __init__(self, model_chunks, lr=3e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, clip_grad=1.0):
        self.params = _params(model_chunks)
        self.clip_grad = clip_grad
        self.inner = torch.optim.AdamW(param_groups(self.params, weight_decay), lr=lr, betas=(beta1, beta2),
                                       eps=eps)

    def scale_loss(self, loss):
        return loss

    def set_lr(self, lr):
        for group in self.inner.param_groups:
            group["lr"] = lr

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        norm = global_norm([p.grad for p in self.params if counts_once(p)])
        clip_by_norm([p.grad for p in self.params], norm, self.clip_grad)
        self.inner.step()
        return True, float(norm)

    # -- checkpoint interface: per-parameter state in the parameter's own (TP-shard) shape, keyed by name,
    # so a checkpoint can be resharded; plus scalars.
    def param_state(self, named_params):
        out = {}
        for name, p in named_params:
            st = self.inner.state.get(p, {})
            out[name] = {k: v.detach().cpu() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")}
        return out

    def scalar_state(self):
        steps = [int(st["step"]) for st in self.inner.state.values() if "step" in st]
        return {"step": max(steps) if steps else 0}

    def load_param_state(self, named_params, state):
        for name, p in named_params:
            if state.get(name):
                self.inner.state[p] = {k: v.to(p.device, torch.float32).clone() for k, v in state[name].items()}

    def load_scalar_state(self, scalars):
        for st in self.inner.state.values():
            st["step"] = torch.tensor(float(scalars["step"]))

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def build_optimizer(model_chunks, opt_cfg, training_cfg=None):
    """``opt_cfg``: the resolved ``[optimizer]`` section (a dict)."""
    return Optimizer(model_chunks, lr=opt_cfg["lr"], weight_decay=opt_cfg["weight_decay"], beta1=opt_cfg["beta1"],
                     beta2=opt_cfg["beta2"], eps=opt_cfg["eps"], clip_grad=opt_cfg["clip_grad"])
