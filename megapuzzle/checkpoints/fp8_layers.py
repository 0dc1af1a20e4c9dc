"""FP8 calibration and quantization one decoder layer at a time (the streamed `export-hf --quantize fp8`).

ModelOpt's whole-model flow (`mtq.quantize(model, FP8_DEFAULT_CFG, loop)`, max calibration, then
`export_hf_checkpoint`) needs the whole model resident: 280 GB of fp32 at 70B. Max calibration is
separable by layer: a Linear's input amax is the max over the calibration tokens of |its input|,
and with quantization off during calibration (ModelOpt collects statistics, it does not quantize)
a layer's input is the unquantized model's hidden state there. So each layer is built alone from
its lazily read fp32 tensors (our DeciLM modeling file's `DeciLMDecoderLayer`: the exported
model's own maths, same ops and shapes as the whole model runs them, hence the same fp32 values),
calibrated by ModelOpt itself (`mtq.quantize(layer, FP8_DEFAULT_CFG, loop)`, the loop feeding the
cached layer inputs), and its outputs become the next layer's inputs.

The tensors are then written as ModelOpt's unified HF exporter writes them (checked bitwise
against it in tests/test_fp8_stream.py): the calibrated model goes to bf16 first, which rounds
the quantizers' amax buffers to bf16 too, then per FP8 Linear
    weight_scale = fp32(bf16(amax_w) / 448)         (amax_w = max |W|)
    input_scale  = fp32(bf16(amax_x)) / 448         (amax_x = max |input| over the calibration tokens)
    weight       = float8_e4m3fn(fp32(bf16(W)) / weight_scale)
and every other tensor (norms, embeddings, lm_head) in bf16. `hf_quant_config.json` comes from
ModelOpt's `get_quant_config` on a meta-device (weightless) quantized skeleton of the whole model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping

import torch

from megapuzzle.arch import Architecture
from megapuzzle.checkpoints.canonical import local_layer_tensors

log = logging.getLogger(__name__).info


def modelopt():
    """(mtq, quant_utils) of nvidia-modelopt; the caller turns an ImportError into its one-line error."""
    import modelopt.torch.export.quant_utils as quant_utils
    import modelopt.torch.quantization as mtq

    return mtq, quant_utils


def decilm_config(arch: Architecture):
    """Our DeciLMConfig (hf_modeling/configuration_decilm.py) for `arch`, as the bf16 export declares it."""
    from megapuzzle.checkpoints.hf_modeling.configuration_decilm import DeciLMConfig

    cfg = arch.to_hf_config(torch_dtype="bfloat16")
    cfg["use_cache"] = True
    return DeciLMConfig(**cfg)


def quantized_skeleton(config):
    """The whole DeciLMForCausalLM on the meta device (no weights, no memory), quantized with
    FP8_DEFAULT_CFG and no calibration: what ModelOpt's config writers need (module names and
    which quantizers are on), never run."""
    from megapuzzle.checkpoints.hf_modeling.modeling_decilm import DeciLMForCausalLM

    mtq, _ = modelopt()
    with torch.device("meta"):
        model = DeciLMForCausalLM(config)
    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, None)
    return model


class LayerStream:
    """Calibration hidden states walked through the model one decoder layer at a time.

    Holds the activations of every calibration batch at the current layer's input (fp32:
    batches x batch_size x seq_len x hidden x 4 bytes, e.g. 8 x 4 x 256 x 16384 x 4 = 537 MB at
    405B's defaults) plus RoPE's cos / sin (batch_size x seq_len x head_dim x 4 bytes, twice);
    each batch's output replaces its input as soon as it is computed, so no second copy exists."""

    def __init__(self, arch: Architecture, embed: torch.Tensor, tokens: torch.Tensor, device: str = "cpu"):
        from megapuzzle.checkpoints.hf_modeling.modeling_decilm import DeciLMRotary

        self.arch, self.config, self.device = arch, decilm_config(arch), device
        embed = embed.to(device=device, dtype=torch.float32)
        # the whole model's first step: inputs_embeds = embed_tokens(input_ids), one batch at a time
        self.hidden = [torch.nn.functional.embedding(b.to(device), embed) for b in tokens]
        b, t = tokens.shape[1:]
        position_ids = torch.arange(t, device=device)[None].expand(b, t)
        self.cos, self.sin = DeciLMRotary(self.config)(self.hidden[0], position_ids)
        # no padding, no cache: the whole model gives its attention layers mask None and SDPA's causal flag
        self.is_causal = True

    def build_layer(self, i: int, tensors: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        """Layer i of the exported model, holding only its own tensors (read now, fp32)."""
        from megapuzzle.checkpoints.hf_modeling.modeling_decilm import DeciLMDecoderLayer

        with torch.device("meta"):  # no init work: every parameter is assigned from the checkpoint
            layer = DeciLMDecoderLayer(self.config, i, cache_slot=0)
        local = {k: v.to(dtype=torch.float32) for k, v in local_layer_tensors(tensors, i).items()}
        layer.load_state_dict(local, strict=True, assign=True)
        return layer.to(self.device).eval()

    def calibrate(self, layer: torch.nn.Module, i: int) -> None:
        """ModelOpt's max calibration of `layer` on the current hidden states; they become its outputs."""
        mtq, _ = modelopt()
        if not any(isinstance(m, torch.nn.Linear) for m in layer.modules()):
            return  # a no-op / no-op layer: the identity, nothing to calibrate (ModelOpt refuses it)
        calls = []

        def forward_loop(m):
            if calls:  # the inputs were replaced by the first pass; a second pass would calibrate on outputs
                raise RuntimeError("ModelOpt ran the calibration loop twice; the streamed FP8 export "
                                   "supports single-pass (max) calibration only")
            calls.append(1)
            with torch.no_grad():
                for j, x in enumerate(self.hidden):
                    self.hidden[j] = m(x, self.cos, self.sin, None, self.is_causal, None)

        mtq.quantize(layer, mtq.FP8_DEFAULT_CFG, forward_loop)
        log(f"[export-hf] fp8 layer {i + 1}/{self.arch.num_layers} calibrated")


def input_amaxes(layer: torch.nn.Module) -> list[float]:
    """The calibrated input amax of every enabled quantized Linear (for the summary)."""
    out = []
    for mod in layer.modules():
        wq, iq = getattr(mod, "weight_quantizer", None), getattr(mod, "input_quantizer", None)
        if wq is not None and getattr(wq, "is_enabled", False) and iq is not None and iq.is_enabled:
            out.append(float(iq.amax.max()))
    return out


def export_layer_tensors(layer: torch.nn.Module, i: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of a calibrated layer as ModelOpt's unified HF exporter writes them: FP8
    weight + fp32 weight_scale / input_scale per FP8 Linear, bf16 for the rest (see module doc)."""
    _, qu = modelopt()
    layer.to(torch.bfloat16)  # as the whole-model export: amax buffers are rounded to bf16 here too
    prefix = f"model.layers.{i}."
    quantized = {}
    for name, mod in layer.named_modules():
        if hasattr(mod, "weight_quantizer") and qu.get_quantization_format(mod) == qu.QUANTIZATION_FP8:
            quantized[name + ".weight"] = mod
    for name, p in layer.state_dict().items():
        if "_quantizer" in name:  # ModelOpt's own buffers (amax) never ship
            continue
        mod = quantized.get(name)
        if mod is None:
            yield prefix + name, p.detach().to(torch.bfloat16)
            continue
        wq = mod.weight_quantizer
        weight_scale = torch.tensor(wq.amax.float().item() / wq.maxbound)  # python double, then fp32
        base = prefix + name[: -len("weight")]
        yield prefix + name, qu.to_quantized_weight(p.detach().float(), weight_scale, qu.QUANTIZATION_FP8)
        yield base + "weight_scale", weight_scale
        yield base + "input_scale", qu.get_activation_scaling_factor(mod).squeeze()
