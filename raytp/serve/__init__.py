"""Ray Serve layer: the application builder, the FastAPI ingress, and the TP-group server deployment."""
