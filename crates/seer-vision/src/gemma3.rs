//! Gemma 3's pan-and-scan (`Gemma3ImageProcessorPil` with `do_pan_and_scan`): an image
//! much wider than tall (or taller than wide) is also cut into 2 to `max_crops` side by
//! side crops, each read as an image of its own after the whole one.

use serde_json::Value;

/// The processor's pan-and-scan settings (`None` from [`PanAndScan::from_json_value`]
/// when `do_pan_and_scan` is off).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PanAndScan {
    pub min_crop_size: u32,
    pub max_crops: u32,
    pub min_ratio: f64,
}

impl PanAndScan {
    /// From the image processor's settings (flat, or nested under `image_processor`).
    pub fn from_json_value(value: &Value) -> Option<PanAndScan> {
        let dict = value.get("image_processor").filter(|v| v.is_object()).unwrap_or(value);
        if dict.get("do_pan_and_scan").and_then(Value::as_bool) != Some(true) {
            return None;
        }
        let num = |key: &str, default: f64| dict.get(key).and_then(Value::as_f64).unwrap_or(default);
        // Gemma3Processor's defaults.
        Some(PanAndScan {
            min_crop_size: num("pan_and_scan_min_crop_size", 256.0) as u32,
            max_crops: num("pan_and_scan_max_num_crops", 4.0) as u32,
            min_ratio: num("pan_and_scan_min_ratio_to_activate", 1.2),
        })
    }

    /// The crops of a `width × height` image, `(x, y, width, height)`, left to right or
    /// top to bottom, the last one cut at the image's edge; none when the image is not
    /// stretched enough or the crops would be too small.
    pub fn crops(&self, width: u32, height: u32) -> Vec<(u32, u32, u32, u32)> {
        let (long, short) = (width.max(height) as f64, width.min(height) as f64);
        if long / short < self.min_ratio {
            return Vec::new();
        }
        // Half-up rounding of the aspect ratio, as many as the minimum size allows, 2 or more.
        let n = ((long / short + 0.5).floor() as u32).min((long / self.min_crop_size as f64).floor() as u32);
        let n = n.max(2).min(self.max_crops);
        let (across, down) = if width >= height { (n, 1) } else { (1, n) };
        let (cw, ch) = (width.div_ceil(across), height.div_ceil(down));
        if cw.min(ch) < self.min_crop_size {
            return Vec::new();
        }
        let mut out = Vec::new();
        for j in 0..down {
            for i in 0..across {
                let (x, y) = (i * cw, j * ch);
                out.push((x, y, cw.min(width - x), ch.min(height - y)));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crops_follow_the_processor() {
        let pas = PanAndScan { min_crop_size: 32, max_crops: 3, min_ratio: 1.2 };
        // The fixture's cases (transformers 5.23): 160x40 and 40x150 in three, a square none.
        assert_eq!(pas.crops(160, 40), vec![(0, 0, 54, 40), (54, 0, 54, 40), (108, 0, 52, 40)]);
        assert_eq!(pas.crops(40, 150), vec![(0, 0, 40, 50), (0, 50, 40, 50), (0, 100, 40, 50)]);
        assert!(pas.crops(96, 96).is_empty());
        // Crops narrower than the minimum: none.
        assert!(PanAndScan { min_crop_size: 256, ..pas }.crops(400, 200).is_empty());
    }
}
