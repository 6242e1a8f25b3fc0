"""UPN: ChatRex's Universal Proposal Network (class-agnostic boxes at two granularities)."""

from transformers import AutoConfig, AutoModel

from upn.configuration_upn import GRANULARITIES, UPNConfig
from upn.modeling_upn import UPNModel, UPNOutput

AutoConfig.register("upn", UPNConfig, exist_ok=True)
AutoModel.register(UPNConfig, UPNModel, exist_ok=True)

__all__ = ["GRANULARITIES", "UPNConfig", "UPNModel", "UPNOutput"]
