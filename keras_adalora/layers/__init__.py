from keras_adalora.layers.dense import AdaLoRADense
from keras_adalora.layers.einsum_dense import AdaLoRAEinsumDense
from keras_adalora.layers.embedding import AdaLoRAEmbedding

ADAPTED_CLASSES = (AdaLoRADense, AdaLoRAEinsumDense, AdaLoRAEmbedding)
