from pipeline.prompts.vocab import load_vocabulary, vocabulary_hash
from pipeline.storage.output import write_manifest
from pipeline.storage.tables import class_names


def test_class_names_use_the_first_synonym(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("sofa; couch\ncat\n")
    entries = load_vocabulary(str(vocab))
    out = tmp_path / "out"
    out.mkdir()
    write_manifest(
        str(out),
        {
            "vocabulary_file": str(vocab),
            "config": {"vocabulary": {"hash": vocabulary_hash(entries)}},
        },
    )
    assert class_names(str(out)) == {0: "sofa", 1: "cat"}
