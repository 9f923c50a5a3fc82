"""The data plane: the ingress replica takes each HTTP call, asks the model type's picker for a
plan, calls the upstream itself and relays the answer (gateway -> picking -> relay), and
reports every outcome back to the picker (outcomes)."""
