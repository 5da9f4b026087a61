# fetch -> validate -> tokenize (llama_adapter.data), and the embedded demo data.


# Compute nodes often have no internet: downloads run where Snakemake runs (the login node under SLURM).
localrules:
    fetch,
    fetch_smollm2,


rule demo_data:
    output:
        corpus=f"{RESULTS}/demo/corpus.jsonl",
        alpaca=f"{RESULTS}/demo/alpaca.json",
        scienceqa=directory(f"{RESULTS}/demo/scienceqa"),
    log:
        f"{RESULTS}/logs/demo_data.log",
    conda:
        CONDA_ENV
    params:
        out=lambda w, output: Path(output.corpus).parent,
        options=cli_options(config["data"].get("demo", {})),
    shell:
        "llama-adapter demo-data --out {params.out:q} {params.options:q} > {log:q} 2>&1"


rule fetch:
    input:
        lambda w: (
            data_source(w.dataset)
            if config["data"][w.dataset]["source"] == "demo"
            else []
        ),
    output:
        directory(f"{RESULTS}/data/{{dataset}}/fetched"),
    log:
        f"{RESULTS}/logs/fetch/{{dataset}}.log",
    conda:
        CONDA_ENV
    params:
        source=lambda w: data_source(w.dataset),
        extra=lambda w: fetch_options(config["data"][w.dataset]),
        # an image path leaving the dataset: stop, or count and list it (validate then drops the record)
        policy=config["data"]["validation"]["policy"],
    shell:
        "llama-adapter fetch --dataset {wildcards.dataset:q} --source {params.source:q} {params.extra:q} "
        "--policy {params.policy:q} --out {output:q} > {log:q} 2>&1"


rule validate:
    input:
        rules.fetch.output,
    output:
        directory(f"{RESULTS}/data/{{dataset}}/validated"),
    log:
        f"{RESULTS}/logs/validate/{{dataset}}.log",
    conda:
        CONDA_ENV
    params:
        policy=config["data"]["validation"]["policy"],
        drop=[
            arg
            for f in config["data"]["validation"]["drop_flags"]
            for arg in ("--drop-flag", f)
        ],
    shell:
        "llama-adapter validate --dataset {wildcards.dataset:q} --fetched {input:q} --out {output:q} "
        "--policy {params.policy:q} {params.drop:q} > {log:q} 2>&1"


rule tokenize:
    input:
        data=rules.validate.output,
        tokenizer=TOKENIZER,
    output:
        directory(f"{RESULTS}/tokens/{{dataset}}"),
    log:
        f"{RESULTS}/logs/tokenize/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/tokenize/{{dataset}}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        # The dataset's own split rule (TokenizeConfig.split_rule): a seeded draw takes the config's size and seed.
        split=lambda w: (
            [
                "--val-size",
                str(config["tokenize"]["alpaca_val_size"]),
                "--seed",
                str(config["tokenize"]["seed"]),
            ]
            if DATASET_SPLIT_BY[w.dataset] == "seed"
            else []
        ),
        mask=[] if config["tokenize"]["mask_prompt"] else ["--no-mask-prompt"],
        max_len=config["tokenize"]["max_seq_len"],
        truncation=config["tokenize"]["truncation"],
    shell:
        "llama-adapter tokenize --dataset {wildcards.dataset:q} --validated {input.data:q} "
        "--tokenizer {input.tokenizer:q} --out {output:q} --max-seq-len {params.max_len:q} "
        "--truncation {params.truncation:q} {params.mask:q} {params.split:q} > {log:q} 2>&1"


rule make_vision_encoder:
    output:
        directory(f"{RESULTS}/models/demo-clip"),
    log:
        f"{RESULTS}/logs/make_vision_encoder.log",
    conda:
        CONDA_ENV
    shell:
        "llama-adapter make-vision-encoder --out {output:q} > {log:q} 2>&1"


# Every ScienceQA image through the frozen encoder, once: training and evaluation read the cache.
rule encode_images:
    input:
        records=f"{RESULTS}/data/scienceqa/validated",
        encoder=ENCODER,
    output:
        directory(IMAGE_FEATURES),
    log:
        f"{RESULTS}/logs/encode_images.log",
    benchmark:
        f"{RESULTS}/benchmarks/encode_images.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=0,
    params:
        records=lambda w, input: f"{input.records}/records.jsonl",
        layers=(
            ["--layers", *map(str, IMAGES["layers"])] if IMAGES.get("layers") else []
        ),
        # Those set in the config; the others are EncodeImagesConfig's.
        options=cli_options(
            {k: IMAGES[k] for k in ("policy", "batch_size") if k in IMAGES}
        ),
    shell:
        "llama-adapter encode-images --encoder {input.encoder:q} --records {params.records:q} "
        "--out {output:q} {params.layers:q} {params.options:q} > {log:q} 2>&1"
