//! Cluster locations on a map: Oakestra's `CLUSTER_LOCATION` ("lat,lon[,radius_m]", else free text) parsed
//! into coordinates, and an equirectangular world map drawn as server-rendered SVG (no tiles, no script).

use maud::{html, Markup};

/// A point on Earth, with the radius (metres) the cluster says it covers, if it says one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Location {
    pub lat: f64,
    pub lon: f64,
    pub radius_m: Option<f64>,
}

/// `"48.1351,11.5820"` or `"48.1351, 11.5820, 1000"` as a location; anything else (a place name, out of
/// range coordinates, extra fields) is `None`: the cluster is then listed but not drawn on the map.
pub fn parse_location(s: &str) -> Option<Location> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    if !(2..=3).contains(&parts.len()) {
        return None;
    }
    let num = |p: &str| p.parse::<f64>().ok().filter(|v| v.is_finite());
    let (lat, lon) = (num(parts[0])?, num(parts[1])?);
    if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
        return None;
    }
    let radius_m = match parts.get(2) {
        Some(r) => Some(num(r).filter(|r| *r >= 0.0)?),
        None => None,
    };
    Some(Location { lat, lon, radius_m })
}

/// The map's size in SVG units: one unit per degree.
pub const MAP_W: f64 = 360.0;
pub const MAP_H: f64 = 180.0;

/// Equirectangular projection onto the map: longitude -180..180 left to right, latitude 90..-90 top to
/// bottom.
pub fn project(lat: f64, lon: f64) -> (f64, f64) {
    ((lon + 180.0) / 360.0 * MAP_W, (90.0 - lat) / 180.0 * MAP_H)
}

/// One cluster as the map draws it.
pub struct MapPoint<'a> {
    pub name: &'a str,
    pub location: Location,
    pub active: bool,
}

/// The map: a graticule every 30 degrees (equator and prime meridian stronger) and one marker per
/// cluster, labelled with its name; hovering shows its coordinates. Names are escaped by maud.
pub fn map_svg(points: &[MapPoint]) -> Markup {
    let lons = (-150..=150).step_by(30);
    let lats = (-60..=60).step_by(30);
    html! {
        svg.map viewBox={ "0 0 " (MAP_W) " " (MAP_H) } role="img" aria-label="cluster map (equirectangular)"
            xmlns="http://www.w3.org/2000/svg" {
            rect.sea x="0" y="0" width=(MAP_W) height=(MAP_H) {}
            @for lon in lons {
                @let (x, _) = project(0.0, f64::from(lon));
                line class=(if lon == 0 { "grid major" } else { "grid" }) x1=(x) y1="0" x2=(x) y2=(MAP_H) {}
            }
            @for lat in lats {
                @let (_, y) = project(f64::from(lat), 0.0);
                line class=(if lat == 0 { "grid major" } else { "grid" }) x1="0" y1=(y) x2=(MAP_W) y2=(y) {}
            }
            @for p in points {
                @let (x, y) = project(p.location.lat, p.location.lon);
                g.marker.active[p.active] data-cluster=(p.name) {
                    title { (p.name) " (" (p.location.lat) ", " (p.location.lon) ")" }
                    circle cx=(round2(x)) cy=(round2(y)) r="2.5" {}
                    text x=(round2(x + 3.5)) y=(round2(y + 1.5)) { (p.name) }
                }
            }
        }
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_with_and_without_radius() {
        assert_eq!(
            parse_location("48.1351,11.5820,1000"),
            Some(Location { lat: 48.1351, lon: 11.582, radius_m: Some(1000.0) })
        );
        assert_eq!(parse_location(" -33.9 , 151.2 "), Some(Location { lat: -33.9, lon: 151.2, radius_m: None }));
        assert_eq!(parse_location("90,-180,0").map(|l| (l.lat, l.lon)), Some((90.0, -180.0)));
    }

    #[test]
    fn free_text_and_bad_coordinates_are_not_drawn() {
        for s in ["", "Munich", "48.1", "48.1,11.5,100,7", "91,0", "0,180.5", "48,11,-5", "NaN,0", "inf,0", "48,east"] {
            assert_eq!(parse_location(s), None, "{s:?}");
        }
    }

    #[test]
    fn projection_corners_and_centre() {
        assert_eq!(project(90.0, -180.0), (0.0, 0.0));
        assert_eq!(project(-90.0, 180.0), (MAP_W, MAP_H));
        assert_eq!(project(0.0, 0.0), (MAP_W / 2.0, MAP_H / 2.0));
        // Munich: east of the prime meridian, north of the equator
        let (x, y) = project(48.1351, 11.582);
        assert!((x - 191.582).abs() < 1e-9 && (y - 41.8649).abs() < 1e-9, "{x},{y}");
    }

    #[test]
    fn map_marks_each_cluster_and_escapes_names() {
        let at = |lat, lon| Location { lat, lon, radius_m: None };
        let svg = map_svg(&[
            MapPoint { name: "munich", location: at(48.1351, 11.582), active: true },
            MapPoint { name: "<b>x</b>", location: at(-33.9, 151.2), active: false },
        ])
        .into_string();
        assert!(svg.contains(r#"data-cluster="munich""#), "{svg}");
        assert!(svg.contains(r#"<circle cx="191.58" cy="41.86""#), "{svg}");
        assert!(svg.contains("&lt;b&gt;x&lt;/b&gt;") && !svg.contains("<b>"), "names are escaped: {svg}");
        assert_eq!(svg.matches("<circle").count(), 2);
        assert_eq!(svg.matches(r#"class="marker active""#).count(), 1, "{svg}");
    }
}
