"""int8 inference of the backbone and FPN: static post-training quantization with torchao's
PT2E flow, lowered to oneDNN's int8 convolutions by ``torch.compile`` (inductor).

Flow (``quantize_backbone``)::

    a float copy of the backbone, its norms folded into the convolutions (as the fast path)
    -> plain Conv2d modules, out-of-place ReLUs (what the quantizer's patterns match)
    -> torch.export (batch, height and width dynamic) -> one source per ReLU call
    -> prepare_pt2e(X86InductorQuantizer: int8 activations per tensor, weights per channel)
    -> calibration batches (observers record activation ranges) -> convert_pt2e
    -> torch.compile(freezing): conv + bias + ReLU (+ residual add) fused into one oneDNN
       int8 convolution; the feature levels come out as float32

oneDNN's int8 convolutions need static shapes: each new input size (batch, height, width)
compiles once (about 20 s for ResNet-50-FPN on two cores), then runs at that size's speed.
A size with a one-pixel feature level (a side of 64 pixels or less after resizing) runs the
float backbone instead, with a warning. The RPN and the box and mask heads stay on the bf16
(or fp32) fast path.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from maskrcnn.model.fast import fold_batchnorm


class Int8Error(RuntimeError):
    """int8 inference cannot be set up (torchao missing, no calibration images, ...)."""


def require_torchao() -> Any:
    """torchao's PT2E quantization module, or an :class:`Int8Error` saying how to get it."""
    # torchao's import logs a deprecation notice of torch's (an Enum registered as a constant).
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        import torchao.quantization.pt2e.quantize_pt2e as pt2e
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
    except ImportError as err:
        raise Int8Error(
            f"int8 inference needs torchao 0.18 ({err}): pip install 'maskrcnn[int8]'"
        ) from None
    finally:
        pytree_log.setLevel(level)
    return pt2e


def _plain_modules(module: nn.Module) -> None:
    """Every Conv2d subclass of ``module`` (ConvFrozenBN, its norm folded away) as a plain
    Conv2d and every ReLU out of place: the quantizer recognises conv / ReLU patterns by
    module type and functional ops."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d) and type(child) is not nn.Conv2d:
                conv = nn.Conv2d(
                    child.in_channels, child.out_channels, child.kernel_size,  # type: ignore[arg-type]
                    child.stride, child.padding, child.dilation,  # type: ignore[arg-type]
                    child.groups, child.bias is not None, child.padding_mode,
                )
                conv.load_state_dict(child.state_dict())
                setattr(parent, name, conv)
            elif isinstance(child, nn.ReLU):
                child.inplace = False


def _one_source_per_relu(graph: torch.fx.Graph) -> None:
    """torchvision's Bottleneck calls one ReLU module three times; the quantizer groups
    nodes by their source module, and a group with three outputs matches no pattern."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.relu.default:
            node.meta["source_fn_stack"] = [(node.name, nn.ReLU)]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torchao warns about every op it leaves in float (max-pool after an fp32 stem)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"torchao\..*")
        warnings.filterwarnings("ignore", message=r".*Enum subclass.*")
        yield


class Int8Backbone(nn.Module):
    """A quantized backbone + FPN: takes the padded, normalised batch (channels-last) and
    returns the same ordered feature levels as the float backbone, in float32."""

    graph: torch.fx.GraphModule  # the quantized graph, dynamic sizes (eager: slow)
    compiled: dict[tuple[int, ...], Callable[[Tensor], Any]]  # one per input size
    fallback: nn.Module  # the float backbone, for sizes the graph was not traced for

    def __init__(self, graph: torch.fx.GraphModule, fallback: nn.Module,
                 out_channels: int) -> None:
        super().__init__()
        # Not submodules: the graphs hold int8 weights that .to() and state_dict() must
        # leave alone, and the float backbone is kept as it is.
        self.__dict__["graph"] = graph
        self.__dict__["compiled"] = {}
        self.__dict__["fallback"] = fallback
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        import torch._inductor.config as inductor_config

        if x.device.type != "cpu":
            raise RuntimeError(f"the int8 backbone runs on the CPU; its input is on {x.device} "
                               "(an int8 model stays on the CPU)")
        x = x.float().contiguous(memory_format=torch.channels_last)
        key = tuple(x.shape)
        # Freezing turns the weights into constants, which the int8 convolutions are
        # packed from; it has to be on when a size compiles (at its first call).
        # The graph sets its own precision: autocast of the surrounding heads stays outside.
        with _quiet(), inductor_config.patch(freezing=True), torch.autocast(x.device.type,
                                                                            enabled=False):
            run = self.compiled.get(key)
            if run is not None:
                return OrderedDict(run(x))
            # oneDNN's int8 convolutions are compiled for one input size, at its first call.
            run = self._compile(x)
            try:
                out = run(x)
            except Exception as err:  # inductor: no C++ compiler, an op it cannot lower, ...
                warnings.warn(f"int8: compiling for input size {key} failed ({err}); that "
                              "size runs in float instead", stacklevel=2)
                run = self.fallback
                out = run(x)
            self.compiled[key] = run
            return OrderedDict(out)

    def _compile(self, x: Tensor) -> Callable[[Tensor], Any]:
        try:
            static = torch.export.export(self.graph, (x,)).module()
        except AssertionError:
            # The graph holds the branches its calibration sizes took: a size with a one-pixel
            # feature level (an input side of 64 or less) takes another.
            warnings.warn(f"int8: input size {tuple(x.shape)} is too small for the quantized "
                          "graph; it runs in float instead", stacklevel=3)
            return self.fallback
        return torch.compile(static)


@torch.no_grad()
def quantize_backbone(backbone: nn.Module, calibration: Iterable[Tensor]) -> Int8Backbone:
    """A copy of ``backbone``, its norms folded, quantized to int8 with activation ranges
    observed on ``calibration``: padded, normalised batches (N, 3, H, W) as the model's
    pre-processing makes them. ``backbone`` itself is not changed."""
    pt2e = require_torchao()
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    batches = [b.float().contiguous(memory_format=torch.channels_last) for b in calibration]
    if not batches:
        raise Int8Error("int8 calibration needs at least one image")
    # One float copy: the graph is exported from it, and it runs the sizes the graph cannot.
    float_net = copy.deepcopy(backbone).float().eval()
    fold_batchnorm(float_net)
    _plain_modules(float_net)
    # Export with a batch of two (a batch of one would fix the batch size at 1).
    example = torch.cat([batches[0][:1], batches[0][:1]])
    dynamic = torch.export.Dim.DYNAMIC
    with _quiet():
        graph = torch.export.export(
            float_net, (example,), dynamic_shapes=({0: dynamic, 2: dynamic, 3: dynamic},)
        ).module()
        _one_source_per_relu(graph.graph)
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = pt2e.prepare_pt2e(graph, quantizer)
        for batch in batches:
            prepared(batch)
        converted = pt2e.convert_pt2e(prepared)
    net = Int8Backbone(converted, float_net, int(getattr(backbone, "out_channels", 256)))
    # The first size compiles now (the calibration images' first size, usually the data's):
    # a failure to compile shows here rather than on the first image to predict.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net(batches[0])
    if net.compiled[tuple(batches[0].shape)] is net.fallback:
        why = "; ".join(str(w.message) for w in caught if "int8" in str(w.message))
        raise Int8Error(f"the quantized backbone does not compile: {why}")
    return net

