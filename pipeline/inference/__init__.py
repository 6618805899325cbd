"""Inference: sliding-window prediction of a trained model, export back to the input's geometry,
a folder of cases in this process or streamed over Ray actors."""
