# The demo's own base (tokenizer + pre-training), and adapter fine-tuning (llama_adapter.train).

# The demo base's settings; a config for a real base may leave them out (the library's defaults).
PRETRAIN = config["base"].get("pretrain", {})


rule train_tokenizer:
    input:
        rules.demo_data.output.corpus,
    output:
        f"{RESULTS}/models/demo-tokenizer.model",
    log:
        f"{RESULTS}/logs/train_tokenizer.log",
    conda:
        CONDA_ENV
    params:
        vocab=PRETRAIN.get("vocab_size", SentencePieceConfig.vocab_size),
    shell:
        "llama-adapter train-tokenizer --corpus {input:q} --out {output:q} --vocab-size {params.vocab:q} > {log:q} 2>&1"


rule fetch_smollm2:
    output:
        SMOLLM2,
    log:
        f"{RESULTS}/logs/fetch_smollm2.log",
    conda:
        CONDA_ENV
    params:
        cache=lambda w, output: Path(output[0]).parents[1],
    shell:
        "llama-adapter fetch-smollm2 --cache-dir {params.cache:q} > {log:q} 2>&1"


# base.source hf:ORG/NAME@REVISION: the files loading needs, in a plain Hugging Face folder with fetch.json, which
# records the commit the revision resolved to (llama_adapter.hub). Defined for such a source only, since its output
# is BASE; a download, so it runs where Snakemake runs, as data.smk's localrules do.
if HUB_BASE:

    rule fetch_base:
        output:
            directory(BASE),
        log:
            f"{RESULTS}/logs/fetch_base.log",
        localrule: True
        conda:
            CONDA_ENV
        params:
            source=config["base"]["source"],
        shell:
            "llama-adapter fetch-base --source {params.source:q} --out {output:q} > {log:q} 2>&1"


rule pretrain_base:
    input:
        corpus=rules.demo_data.output.corpus,
        tokenizer=rules.train_tokenizer.output,
    output:
        directory(f"{RESULTS}/models/demo-base"),
    log:
        f"{RESULTS}/logs/pretrain_base.log",
    benchmark:
        f"{RESULTS}/benchmarks/pretrain_base.tsv"
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        options=cli_options({k: v for k, v in PRETRAIN.items() if k != "vocab_size"}),
    shell:
        "llama-adapter pretrain-base --corpus {input.corpus:q} --tokenizer {input.tokenizer:q} --out {output:q} "
        "{params.options:q} > {log:q} 2>&1"


# --resume continues a job stopped mid-way (a SLURM time limit) from its checkpoint.pt; the library removes the
# checkpoint once the adapter is written, so that a forced rerun trains afresh instead of resuming at the end.
# `exec`: the training (or torchrun, which passes signals on to its workers) takes the shell's place, so that
# SLURM's SIGTERM reaches it and it can save a checkpoint; bash would not hand over a command with redirections.
rule train_adapter:
    input:
        base=BASE,
        tokens=training_tokens,
        images=image_features,
    # The weights' file name depends on the method (config.WEIGHTS: adapter.safetensors, PEFT's
    # adapter_model.safetensors, model/ for a full fine-tune), which an output pattern cannot say; metrics.json,
    # written after the weights, marks a finished training, and a failed one removes both (config.training_outputs).
    output:
        metrics=f"{RESULTS}/adapters/{{experiment}}/metrics.json",
    log:
        f"{RESULTS}/logs/train_adapter/{{experiment}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_adapter/{{experiment}}.tsv"
    conda:
        CONDA_ENV
    # One core: on the demo's 2 cores two trainings then run side by side, which halves the DAG's training time
    # (a tiny model's step is mostly Python, which a second thread does not speed up); a cluster profile sets
    # the CPUs of its GPU jobs itself. gpu counts the job's GPUs; nodes > 1 starts a torchrun per node with srun
    # (common.smk's launcher; docs/MULTINODE.md), which also needs the SLURM executor's mpi resource.
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=0,
        nodes=1,
    params:
        out=lambda w, output: Path(output.metrics).parent,
        options=lambda w: cli_options(trained_settings(w.experiment))
        + compile_cache(experiment(w.experiment)[1]),
        train=lambda w, input: f"{input.tokens}/train",
        val=lambda w, input: f"{input.tokens}/val",
        launcher=lambda w, resources, threads: launcher(resources, threads),
        expect=lambda w, resources: expectations(resources),
        tags=lambda w: [
            "--tag",
            "rule=train_adapter",
            "--tag",
            f"experiment={w.experiment}",
        ],
    shell:
        "exec {params.launcher:q} train --base {input.base:q} --train-data {params.train:q} --val-data {params.val:q} "
        "--out-dir {params.out:q} --run-name {wildcards.experiment:q} --resume {params.expect:q} "
        "{params.tags:q} {params.options:q} > {log:q} 2>&1"
