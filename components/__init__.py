"""KFP components: one lightweight Python component per stage, bodies only call the stage.

Each component runs on the project image (which already holds automoe and kfp), so it
is compiled with `install_kfp_package=False` and installs nothing at run time.
"""

from components.evaluate import evaluate
from components.images import IMAGE
from components.measure_latency import measure_latency, merge_latency
from components.params import resolve_params
from components.prepare_data import prepare_data
from components.register import register
from components.retrain import retrain
from components.search import search
from components.tracking import close_tracking, open_tracking
from components.train_predictor import train_predictor
from components.train_supernet import train_supernet, train_supernet_nodes

__all__ = [
    "IMAGE",
    "close_tracking",
    "evaluate",
    "measure_latency",
    "merge_latency",
    "open_tracking",
    "prepare_data",
    "register",
    "resolve_params",
    "retrain",
    "search",
    "train_predictor",
    "train_supernet",
    "train_supernet_nodes",
]
