"""Scale-out: placement policy, the routing gateway, and node agents deployed on Ray."""
