"""Getting datasets: the registry of published benchmarks, downloads, safe extraction, local sources, the
two embedded generators (synth, words), one recipe per benchmark family, and the manifests they write."""
