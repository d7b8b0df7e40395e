"""Mixture-of-experts feed-forward: router, experts and dispatch, losses, the layer."""

from .experts import Experts, looped_dispatch, sorted_dispatch
from .layer import DenseFeedForward, MoEFeedForward, RouterStats, capacity_keep, router_metrics
from .losses import load_balancing_loss, router_entropy, router_losses, router_z_loss
from .router import Routing, TopKRouter

__all__ = [
    "DenseFeedForward",
    "Experts",
    "MoEFeedForward",
    "RouterStats",
    "Routing",
    "TopKRouter",
    "capacity_keep",
    "load_balancing_loss",
    "looped_dispatch",
    "router_entropy",
    "router_losses",
    "router_metrics",
    "router_z_loss",
    "sorted_dispatch",
]
