import torch
import torch.nn.functional as F

import gem


def test_single_template_is_the_release_prompt(tiny_clip):
    model, tokenizer = tiny_clip
    got = gem.encode_class_names(model, tokenizer, ["cat", "dog"])
    with torch.no_grad():
        want = F.normalize(
            model.encode_text(tokenizer(["a photo of a cat.", "a photo of a dog."])), dim=-1
        )
    torch.testing.assert_close(got, want)


def test_imagenet_templates_average_80_prompts(tiny_clip):
    model, tokenizer = tiny_clip
    templates = gem.get_templates("imagenet")
    assert len(templates) == 80
    got = gem.encode_class_names(model, tokenizer, ["cat", "tree"], "imagenet", batch_size=7)
    with torch.no_grad():
        prompts = [t("tree") for t in templates]
        each = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
    torch.testing.assert_close(got[1], F.normalize(each.mean(0), dim=0), atol=1e-6, rtol=0)
    assert torch.allclose(got.norm(dim=-1), torch.ones(2))


def test_custom_templates(tiny_clip):
    model, tokenizer = tiny_clip
    a = gem.encode_class_names(model, tokenizer, ["cat"], ["a {} in the wild.", lambda c: f"{c}!"])
    b = gem.encode_class_names(model, tokenizer, ["cat"], ["a {} in the wild."])
    assert not torch.allclose(a, b)


def test_gem_encode_text_uses_its_tokenizer(tiny_clip):
    model, tokenizer = tiny_clip
    wrapped = gem.GEM(model, tokenizer=tokenizer)
    torch.testing.assert_close(
        wrapped.encode_text(["cat"]), gem.encode_class_names(model, tokenizer, ["cat"])
    )
