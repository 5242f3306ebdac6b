"""Generated protobuf and gRPC code for the tether.v1 contract. Do not edit: run `make proto`."""
