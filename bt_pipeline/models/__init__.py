"""Model builders. They build keras.Models from plain arguments or a model config, and never
import the data, training or tuning code."""
