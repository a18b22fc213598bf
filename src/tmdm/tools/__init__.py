"""Tools around a run: the train-step and input benchmarks (bench.py), sampling throughput
(sample_bench.py), compile-check for meshes and TPU topologies (compile_check.py), the sampler-settings
sweep (sample_sweep.py), the checkpoint fingerprint's exactness and memory (fingerprint_check.py). May
import evaluation/ and below."""
