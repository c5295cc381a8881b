"""What an admin runs once to set a site up: Slurm configuration and checks, Kubernetes manifests."""
