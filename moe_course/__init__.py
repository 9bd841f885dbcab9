"""moe_course: the companion package of the course on compressing Mixture-of-Experts models."""

__version__ = "0.1.0"
