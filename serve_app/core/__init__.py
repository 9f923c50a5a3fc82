"""What every part shares: the models config and its validation, request schemas, errors in
the OpenAI shape, token estimates, metrics, and the Serve settings of the processes."""
