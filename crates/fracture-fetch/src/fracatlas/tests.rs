use super::*;

#[test]
fn the_split_is_stratified_deterministic_and_follows_the_seed() {
    let ids: Vec<String> = (0..200).map(|i| format!("IMG{i:07}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let plan = SplitPlan::default();
    let a = plan.assign(&refs);
    let count = |v: &[(&str, usize)], s: usize| v.iter().filter(|(_, x)| *x == s).count();
    assert_eq!((count(&a, 0), count(&a, 1), count(&a, 2)), (140, 30, 30));
    assert_eq!(a, plan.assign(&refs));
    let other = SplitPlan { seed: 7, ..plan }.assign(&refs);
    let sorted = |v: &[(&str, usize)]| {
        let mut v: Vec<(String, usize)> = v.iter().map(|(id, s)| (id.to_string(), *s)).collect();
        v.sort();
        v
    };
    assert_ne!(sorted(&a), sorted(&other), "another seed draws another split");
    assert!(
        SplitPlan {
            val: 0.6,
            test: 0.4,
            seed: 1
        }
        .check()
        .is_err()
    );
    assert!(
        SplitPlan {
            val: f64::NAN,
            ..plan
        }
        .check()
        .is_err()
    );
}

#[test]
fn hex_md5_becomes_base64() {
    assert_eq!(
        hex_to_base64("5d41402abc4b2a76b9719d911017c592").unwrap(),
        base64::engine::general_purpose::STANDARD.encode(Md5::digest(b"hello"))
    );
    assert!(hex_to_base64("xyz").is_err());
}

#[test]
fn release_folders_name_their_class() {
    assert_eq!(folder_class(Path::new("a/images/Fractured/IMG1.jpg")), Some(0));
    assert_eq!(
        folder_class(Path::new("a/images/Non_fractured/IMG2.jpg")),
        Some(1)
    );
    assert_eq!(folder_class(Path::new("a/images/other/IMG3.jpg")), None);
}
