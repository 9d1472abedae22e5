from keras_adalora.layers.conv import AdaLoRAConv1D
from keras_adalora.layers.conv import AdaLoRAConv2D
from keras_adalora.layers.conv import AdaLoRAConv3D
from keras_adalora.layers.dense import AdaLoRADense
from keras_adalora.layers.einsum_dense import AdaLoRAEinsumDense
from keras_adalora.layers.embedding import AdaLoRAEmbedding
from keras_adalora.layers.position_embedding import AdaLoRAPositionEmbedding
from keras_adalora.layers.reversible_embedding import AdaLoRAReversibleEmbedding

ADAPTED_CLASSES = (
    AdaLoRADense,
    AdaLoRAEinsumDense,
    AdaLoRAEmbedding,
    AdaLoRAReversibleEmbedding,
    AdaLoRAPositionEmbedding,
    AdaLoRAConv1D,
    AdaLoRAConv2D,
    AdaLoRAConv3D,
)
