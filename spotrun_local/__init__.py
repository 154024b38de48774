"""The local cloud: spotrun on one machine (moto as AWS, trainers as processes)."""
