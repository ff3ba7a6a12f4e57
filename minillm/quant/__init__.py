"""Weight-only quantization: int8 per output channel, int4 in groups, and the files that hold them.

    from minillm.quant import quantize_model, quantize_checkpoint, load_quantized
    quantize_model(model, bits=4, group_size=32)   # swap Linear -> QuantLinear in place
"""
from minillm.quant.files import (default_out_path, file_kind, load_quantized, quantize_checkpoint,
                                 quantized_source)
from minillm.quant.formats import (Int4Weight, Int8Weight, pack_int4, quantize_weight,
                                   unpack_int4)
from minillm.quant.linear import QuantLinear, quantizable_layers, quantize_model

__all__ = ["Int8Weight", "Int4Weight", "pack_int4", "unpack_int4", "quantize_weight",
           "QuantLinear", "quantize_model", "quantizable_layers", "quantize_checkpoint",
           "load_quantized", "file_kind", "default_out_path", "quantized_source"]
