"""What users import: the distributed model and its configuration."""

from brigade.client.config import ClientConfig
from brigade.client.core import AsyncDistributedModelForCausalLM
from brigade.client.model import DistributedModelForCausalLM

__all__ = ["AsyncDistributedModelForCausalLM", "ClientConfig", "DistributedModelForCausalLM"]
