"""Small joint graphs for pass tests, traced with make_fx and labelled like the frontend does."""

import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from shardgraph import meta


def joint_graph(loss_of, parameters: dict, inputs: dict):
    """Trace ``loss_of(params, inputs) -> loss`` and its gradients into one flat fx graph."""
    parameter_names = list(parameters)
    input_names = list(inputs)

    def step(*flat):
        params = dict(zip(parameter_names, flat[: len(parameter_names)]))
        batch = dict(zip(input_names, flat[len(parameter_names):]))
        loss = loss_of(params, batch)
        grads = torch.autograd.grad(loss, list(params.values()))
        return (loss, *grads)

    leaves = [p.detach().requires_grad_(True) for p in parameters.values()]
    gm = make_fx(step)(*leaves, *inputs.values())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, name in zip(placeholders, parameter_names + input_names):
        kind = meta.InputKind.PARAMETER if name in parameters else meta.InputKind.INPUT
        meta.set_graph_input(node, meta.GraphInput(kind, name))
    meta.set_output_roles(gm, [meta.OutputRole("loss")] + [meta.OutputRole("grad", n) for n in parameter_names])
    return gm


def attention_loss(params, batch, heads=4):
    x = batch["x"]
    b, s, h = x.shape
    head_dim = h // heads

    def split(t):
        return t.view(b, s, heads, head_dim).transpose(1, 2)

    q = split(x @ params["q_proj.weight"].t())
    k = split(x @ params["k_proj.weight"].t())
    v = split(x @ params["v_proj.weight"].t())
    scores = (q @ k.transpose(-1, -2)) / head_dim**0.5
    attended = scores.softmax(-1) @ v
    out = attended.transpose(1, 2).reshape(b, s, h) @ params["o_proj.weight"].t()
    return (out * out).mean()


def attention_case(hidden=16, batch=4, seq=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = {n: torch.randn(hidden, hidden, generator=generator) * 0.3 for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")}
    inputs = {"x": torch.randn(batch, seq, hidden, generator=generator)}
    return params, inputs


def lm_loss(params, batch):
    ids = batch["ids"]
    x = F.embedding(ids, params["embed.weight"])
    logits = x @ params["head.weight"].t()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


class TracedJoint:
    """The names a traced program carries, for graphs built with ``joint_graph``."""

    def __init__(self, gm, parameters, inputs):
        self.graph_module = gm
        self.parameter_names = list(parameters)
        self.buffer_names = []
        self.input_names = list(inputs)
        self.has_loss = True
        self.output_spec = [("loss", None)] + [("grad", n) for n in parameters]
