use super::*;
use proptest::prelude::*;

proptest! {
    #[test]
    fn the_linear_window_is_monotone_and_clamped(c in -5000.0f64..5000.0, w in 1.0f64..8000.0, a in -10000.0f64..10000.0, b in -10000.0f64..10000.0) {
        let (lo, hi) = (a.min(b), a.max(b));
        let (ya, yb) = (voi_linear(lo, c, w), voi_linear(hi, c, w));
        prop_assert!(ya <= yb + 1e-12);
        prop_assert!((0.0..=1.0).contains(&ya) && (0.0..=1.0).contains(&yb));
        prop_assert_eq!(voi_linear(c - w, c, w), 0.0);
        prop_assert_eq!(voi_linear(c + w, c, w), 1.0);
        let (ea, eb) = (voi_linear_exact(lo, c, w), voi_linear_exact(hi, c, w));
        prop_assert!(ea <= eb && (0.0..=1.0).contains(&ea) && (0.0..=1.0).contains(&eb));
        let (sa, sb) = (voi_sigmoid(lo, c, w), voi_sigmoid(hi, c, w));
        prop_assert!(sa <= sb && (0.0..=1.0).contains(&sa));
    }

    #[test]
    fn monochrome1_inverts_exactly(values in proptest::collection::vec(-4096.0f64..4096.0, 1..64), c in -100.0f64..100.0, w in 1.0f64..5000.0) {
        let voi = Voi::Linear { center: c, width: w };
        let m2 = to_display(&values, &voi, false);
        let m1 = to_display(&values, &voi, true);
        for (a, b) in m2.iter().zip(&m1) {
            prop_assert_eq!(u16::from(*a) + u16::from(*b), 255);
        }
    }

    #[test]
    fn stored_values_mask_and_sign_extend(v in 0u32..4096, junk in 0u32..16) {
        // 12 bits stored in 16: the top four bits are junk and ignored.
        let raw = v | (junk << 12);
        prop_assert_eq!(stored_value(raw, 12, false), i64::from(v));
        let signed = stored_value(raw, 12, true);
        prop_assert_eq!(signed, if v >= 2048 { i64::from(v) - 4096 } else { i64::from(v) });
    }
}

#[test]
fn a_panic_inside_a_contained_decoder_is_an_error_with_its_message() {
    assert_eq!(contain(|| 7), Ok(7));
    let e = contain(|| -> u8 { panic!("codec bug at byte {}", 12) }).unwrap_err();
    assert_eq!(e, "codec bug at byte 12");
    let short: Vec<u8> = vec![1, 2];
    let e = contain(|| short[..std::hint::black_box(5)].len()).unwrap_err();
    assert!(e.contains("out of range"), "{e}");
    // Nested containment unwinds only to the inner boundary.
    assert_eq!(
        contain(|| contain(|| -> u8 { panic!("inner") }).is_err()),
        Ok(true)
    );
}

#[test]
fn the_linear_window_follows_the_standard() {
    // PS3.3 C.11.2.1.2.1 with c = 2048, w = 4096: the full 12-bit range.
    assert_eq!(voi_linear(0.0, 2048.0, 4096.0), 0.0);
    assert_eq!(voi_linear(4095.0, 2048.0, 4096.0), 1.0);
    assert!((voi_linear(2047.5, 2048.0, 4096.0) - 0.5).abs() < 1e-12);
    // Width 1: a threshold at c − 0.5.
    assert_eq!(voi_linear(9.4, 10.0, 1.0), 0.0);
    assert_eq!(voi_linear(9.6, 10.0, 1.0), 1.0);
}

#[test]
fn the_percentile_window_leaves_out_the_padding() {
    let mut values: Vec<i64> = (0..1000).collect();
    values.extend(std::iter::repeat_n(-2000, 5000));
    assert_eq!(percentile_window(&values, Some(-2000)), Some((5, 995)));
    assert_eq!(percentile_window(&[-2000], Some(-2000)), None);
    // A range too wide for a histogram gives the same answer by sorting.
    let mut wide: Vec<i64> = (0..1000).map(|v| v << 20).collect();
    wide.push(-2000);
    assert_eq!(percentile_window(&wide, Some(-2000)), Some((5 << 20, 995 << 20)));
}
