"""serve: the Ray Serve app, the model client, bulk jobs and the rules on what a server may touch."""
