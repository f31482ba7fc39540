"""Loading PyTorch Geometric on demand (it takes seconds, and it is an optional extra)."""


def pyg_layers():
    """:mod:`sdfa.graph.layers` (importing PyG and registering its layers), or a clear error."""
    try:
        from . import layers
    except ImportError as error:
        raise ValueError(f"graph networks need PyTorch Geometric ({error}): pip install "
                         "'sdfa[graph]'") from None
    return layers
