//! Image-text retrieval recall: how often the right caption is among the k texts closest to an
//! image, and the right image among the k images closest to a caption (cosine similarity of the
//! embeddings). Captions are compared by their text: a caption that several images share is one
//! candidate, and it is a hit for any of those images (and any of them is a hit for it), so a
//! dataset whose prompts repeat is not scored as if its duplicates were wrong answers.

use std::collections::BTreeMap;

use serde::Serialize;

/// Recall at 1 and 5 in both directions, as fractions in [0, 1].
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Recall {
    /// Images whose caption is the closest text.
    pub image_to_text_r1: f64,
    /// Images whose caption is among the five closest texts.
    pub image_to_text_r5: f64,
    /// Captions whose closest image is one of theirs.
    pub text_to_image_r1: f64,
    /// Captions with one of their images among the five closest.
    pub text_to_image_r5: f64,
}

/// Recall of `image_embeddings` (`n` rows of `dim`) against the captions `captions[i]` of image
/// `i`, whose embeddings are `text_embeddings` (one row per image, in the same order; rows of the
/// same caption text are the same candidate, the first one's embedding is used). Ties in
/// similarity rank the earlier candidate first.
pub fn retrieval_recall(image_embeddings: &[f32], text_embeddings: &[f32], captions: &[String], dim: usize) -> Recall {
    let n = captions.len();
    assert_eq!(image_embeddings.len(), n * dim, "one image embedding per caption");
    assert_eq!(text_embeddings.len(), n * dim, "one text embedding per caption");
    if n == 0 {
        return Recall::default();
    }
    // Distinct captions, in first-seen order, and which one each image has.
    let mut distinct: BTreeMap<&str, usize> = BTreeMap::new();
    let mut first_row = Vec::new();
    let caption_of: Vec<usize> = captions
        .iter()
        .enumerate()
        .map(|(row, c)| {
            let next = distinct.len();
            *distinct.entry(c.as_str()).or_insert_with(|| {
                first_row.push(row);
                next
            })
        })
        .collect();
    let unit = |rows: &[f32]| -> Vec<Vec<f64>> {
        rows.chunks_exact(dim)
            .map(|r| {
                let norm = r.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt().max(1e-12);
                r.iter().map(|&v| f64::from(v) / norm).collect()
            })
            .collect()
    };
    let images = unit(image_embeddings);
    let texts: Vec<Vec<f64>> = {
        let all = unit(text_embeddings);
        first_row.iter().map(|&row| all[row].clone()).collect()
    };
    let similarity = |i: usize, t: usize| images[i].iter().zip(&texts[t]).map(|(a, b)| a * b).sum::<f64>();
    // The rank of `target` among `candidates` scored by `score`: how many score higher, or equal
    // and come earlier.
    let rank = |count: usize, score: &dyn Fn(usize) -> f64, is_hit: &dyn Fn(usize) -> bool| -> usize {
        let scores: Vec<f64> = (0..count).map(score).collect();
        let mut order: Vec<usize> = (0..count).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        order.iter().position(|&c| is_hit(c)).unwrap_or(count)
    };
    let (mut i2t, mut t2i) = ([0usize; 2], [0usize; 2]);
    for (i, &caption) in caption_of.iter().enumerate() {
        let r = rank(texts.len(), &|t| similarity(i, t), &|t| t == caption);
        i2t[0] += usize::from(r < 1);
        i2t[1] += usize::from(r < 5);
    }
    for t in 0..texts.len() {
        let r = rank(n, &|i| similarity(i, t), &|i| caption_of[i] == t);
        t2i[0] += usize::from(r < 1);
        t2i[1] += usize::from(r < 5);
    }
    let (images_n, texts_n) = (n as f64, texts.len() as f64);
    Recall {
        image_to_text_r1: i2t[0] as f64 / images_n,
        image_to_text_r5: i2t[1] as f64 / images_n,
        text_to_image_r1: t2i[0] as f64 / texts_n,
        text_to_image_r5: t2i[1] as f64 / texts_n,
    }
}

#[cfg(test)]
mod tests {
    use super::retrieval_recall;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn perfect_and_swapped_embeddings() {
        // Image i and text i point the same way: every retrieval is right at rank 1.
        let emb = [1.0, 0.0, 0.0, 1.0, -1.0, 0.0];
        let r = retrieval_recall(&emb, &emb, &strings(&["a", "b", "c"]), 2);
        assert_eq!((r.image_to_text_r1, r.text_to_image_r1, r.image_to_text_r5), (1.0, 1.0, 1.0));
        // Texts of images 0 and 1 swapped: those two miss at 1 but hit at 5 (only 3 candidates).
        let texts = [0.0, 1.0, 1.0, 0.0, -1.0, 0.0];
        let r = retrieval_recall(&emb, &texts, &strings(&["a", "b", "c"]), 2);
        assert!((r.image_to_text_r1 - 1.0 / 3.0).abs() < 1e-12 && r.image_to_text_r5 == 1.0);
        assert!((r.text_to_image_r1 - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn a_shared_caption_is_one_candidate_and_a_hit_for_each_of_its_images() {
        // Images 0 and 1 share caption "a"; its one candidate is row 0's text embedding.
        let images = [1.0, 0.0, 0.9, 0.1, 0.0, 1.0];
        let texts = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0];
        let r = retrieval_recall(&images, &texts, &strings(&["a", "a", "b"]), 2);
        assert_eq!(r.image_to_text_r1, 1.0, "image 1 retrieves the shared caption: a hit");
        assert_eq!(r.text_to_image_r1, 1.0, "caption a retrieves image 0, one of its images");
    }
}
