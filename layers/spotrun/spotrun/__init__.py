"""spotrun control plane: the library shared by every Lambda function."""
