"""AdaLoRA (adaptive-rank LoRA) for Keras 3 on TensorFlow, JAX and PyTorch."""

from keras_adalora.allocator import RankAllocator
from keras_adalora.apply import apply_adalora
from keras_adalora.callback import RankBudgetCallback
from keras_adalora.disabling import disable_adapter
from keras_adalora.export import compact_adalora
from keras_adalora.export import get_rank_pattern
from keras_adalora.export import merge_adalora
from keras_adalora.history import export_rank_history
from keras_adalora.history import rank_history
from keras_adalora.interchange import export_peft
from keras_adalora.interchange import import_peft
from keras_adalora.layers import AdaLoRAConv1D
from keras_adalora.layers import AdaLoRAConv2D
from keras_adalora.layers import AdaLoRAConv3D
from keras_adalora.layers import AdaLoRADense
from keras_adalora.layers import AdaLoRAEinsumDense
from keras_adalora.layers import AdaLoRAEmbedding
from keras_adalora.layers import AdaLoRAPositionEmbedding
from keras_adalora.layers import AdaLoRAReversibleEmbedding
from keras_adalora.optimizer import AdaLoRAOptimizer
from keras_adalora.plotting import plot_rank_allocation
from keras_adalora.plotting import plot_rank_history
from keras_adalora.saving import load_adapter
from keras_adalora.saving import save_adapter
from keras_adalora.summary import summary

__version__ = "0.2.0.dev0"

__all__ = [
    "AdaLoRAConv1D",
    "AdaLoRAConv2D",
    "AdaLoRAConv3D",
    "AdaLoRADense",
    "AdaLoRAEinsumDense",
    "AdaLoRAEmbedding",
    "AdaLoRAOptimizer",
    "AdaLoRAPositionEmbedding",
    "AdaLoRAReversibleEmbedding",
    "RankAllocator",
    "RankBudgetCallback",
    "apply_adalora",
    "compact_adalora",
    "disable_adapter",
    "export_peft",
    "export_rank_history",
    "get_rank_pattern",
    "import_peft",
    "load_adapter",
    "merge_adalora",
    "plot_rank_allocation",
    "plot_rank_history",
    "rank_history",
    "save_adapter",
    "summary",
]
